"""``rlhf eval policy``: sample from a policy on sandbox prompts and score with the gold reward.

Writes, into a folder of its own (default ``runs/eval_policy/<model path>``, never inside the
model folder): ``metrics.json`` (gold reward, accuracy, length and EOS rate, overall and per
skill), ``samples.jsonl`` (one line per sample: prompt, response, parsed answer, the gold
answer and verdict) and the resolved ``config.yaml``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from pydantic import Field

from ..config import Config, ModelConfig, save_config
from ..data.readers import read_records
from ..data.records import Prompt
from ..distributed import device
from ..errors import UserError
from ..generation.hf import generate_hf
from ..generation.sampling import Sample, SamplingConfig
from ..io import write_json, write_jsonl
from ..models.loading import load_model, load_tokenizer
from ..sandbox import gold_reward, parse_answer


class EvalPolicyConfig(Config):
    model: ModelConfig = ModelConfig(path="runs/sft/model")
    prompts: str = Field("runs/sandbox-data/prompts_eval.jsonl", description="sandbox prompts with meta")
    limit: int = Field(0, ge=0, description="evaluate only the first N prompts (0 = all)")
    sampling: SamplingConfig = SamplingConfig(n=1, temperature=1.0, max_new_tokens=64, batch_size=64)
    out: str | None = Field(
        None, description="folder for metrics.json, samples.jsonl and config.yaml "
        "(default: runs/eval_policy/<model path with / as ->)")


def gold_metrics(prompts: list[Prompt], samples: list[list[Sample]]) -> dict:
    """Gold reward, accuracy, length and EOS rate, overall and per skill."""
    rows = []
    for p, group in zip(prompts, samples, strict=True):
        for s in group:
            g = gold_reward(p.meta, s.text, ended=s.finish_reason == "stop")
            rows.append((p.meta["skill"], g.reward, g.correct, s.num_tokens, len(s.text), s.finish_reason == "stop"))

    def summary(rs: list) -> dict:
        n = len(rs)
        return {
            "gold_reward": sum(r[1] for r in rs) / n,
            "accuracy": sum(r[2] for r in rs) / n,
            "mean_tokens": sum(r[3] for r in rs) / n,
            "mean_chars": sum(r[4] for r in rs) / n,
            "eos_rate": sum(r[5] for r in rs) / n,
            "n": n,
        }

    by_skill = defaultdict(list)
    for r in rows:
        by_skill[r[0]].append(r)
    return {**summary(rows), "per_skill": {k: summary(v) for k, v in sorted(by_skill.items())}}


def sample_records(prompts: list[Prompt], samples: list[list[Sample]]) -> list[dict]:
    """One record per sample: the prompt, the response, its parsed answer and the gold verdict."""
    out = []
    for p, group in zip(prompts, samples, strict=True):
        for k, s in enumerate(group):
            g = gold_reward(p.meta, s.text, ended=s.finish_reason == "stop")
            out.append({"id": p.id, "sample": k, "skill": p.meta["skill"], "prompt": p.prompt,
                        "response": s.text, "answer": parse_answer(s.text), "gold_answer": p.meta["answer"],
                        "correct": g.correct, "gold_reward": g.reward, "filler_words": g.filler_words,
                        "finish_reason": s.finish_reason, "num_tokens": s.num_tokens})
    return out


def evaluate_policy(model, tokenizer, prompts: list[Prompt], sampling: SamplingConfig,
                    progress: bool = True) -> tuple[dict, list[list[Sample]]]:
    """(gold metrics, the samples per prompt)."""
    if any(not p.meta or "skill" not in p.meta for p in prompts):
        raise UserError("gold evaluation needs sandbox prompts (records with meta.skill)")
    samples = generate_hf(model, tokenizer, [p.messages() for p in prompts], sampling, progress)
    return gold_metrics(prompts, samples), samples


def default_out(model_path: str) -> Path:
    """``runs/eval_policy/<model path>``, the path flattened (``runs/demo/sft/model`` ->
    ``demo-sft-model``), so that the evaluations of different models never collide."""
    parts = [x for x in Path(model_path).expanduser().parts if x not in ("/", ".", "..", "~")]
    if len(parts) > 1 and parts[0] == "runs":
        parts = parts[1:]
    return Path("runs") / "eval_policy" / "-".join(parts)


def run_eval_policy(cfg: EvalPolicyConfig) -> dict:
    prompts = read_records(cfg.prompts, Prompt)
    prompts = prompts[: cfg.limit] if cfg.limit else prompts
    torch.manual_seed(cfg.sampling.seed)
    model, tokenizer = load_model(cfg.model).to(device()), load_tokenizer(cfg.model)
    result, samples = evaluate_policy(model, tokenizer, prompts, cfg.sampling)
    out = Path(cfg.out) if cfg.out else default_out(cfg.model.path)
    records = sample_records(prompts, samples)
    write_jsonl(out / "samples.jsonl", records)
    write_json(out / "metrics.json", {"model": cfg.model.path, "prompts": cfg.prompts, **result})
    save_config(cfg, out / "config.yaml")
    print(format_table(result))
    print(f"eval policy: metrics.json and samples.jsonl ({len(records)} samples) -> {out}")
    return result


def format_table(result: dict) -> str:
    head = f"{'skill':<10} {'gold':>7} {'acc':>6} {'tokens':>7} {'eos':>6} {'n':>5}"
    lines = [head, "-" * len(head)]
    for name, r in [*result["per_skill"].items(), ("all", result)]:
        lines.append(f"{name:<10} {r['gold_reward']:>7.3f} {r['accuracy']:>6.3f} "
                     f"{r['mean_tokens']:>7.1f} {r['eos_rate']:>6.3f} {r['n']:>5}")
    return "\n".join(lines)
