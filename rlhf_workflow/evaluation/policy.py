"""``rlhf eval policy``: sample from a policy on sandbox prompts and score with the gold reward."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from pydantic import Field

from ..config import Config, ModelConfig, save_config
from ..data.readers import read_records
from ..data.records import Prompt
from ..errors import UserError
from ..generation.hf import Sample, SamplingConfig, generate_hf
from ..io import write_json
from ..models.loading import load_model, load_tokenizer
from ..sandbox import gold_reward


class EvalPolicyConfig(Config):
    model: ModelConfig = ModelConfig(path="runs/sft/model")
    prompts: str = Field("runs/sandbox-data/prompts_eval.jsonl", description="sandbox prompts with meta")
    limit: int = Field(0, ge=0, description="evaluate only the first N prompts (0 = all)")
    sampling: SamplingConfig = SamplingConfig(n=1, temperature=1.0, max_new_tokens=64, batch_size=64)
    out: str | None = Field(None, description="JSON file for the results (default: next to the model)")


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


def evaluate_policy(model, tokenizer, prompts: list[Prompt], sampling: SamplingConfig,
                    progress: bool = True) -> dict:
    if any(not p.meta or "skill" not in p.meta for p in prompts):
        raise UserError("gold evaluation needs sandbox prompts (records with meta.skill)")
    samples = generate_hf(model, tokenizer, [p.messages() for p in prompts], sampling, progress)
    return gold_metrics(prompts, samples)


def run_eval_policy(cfg: EvalPolicyConfig) -> dict:
    prompts = read_records(cfg.prompts, Prompt)
    prompts = prompts[: cfg.limit] if cfg.limit else prompts
    torch.manual_seed(cfg.sampling.seed)
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    result = evaluate_policy(model, tokenizer, prompts, cfg.sampling)
    out = Path(cfg.out) if cfg.out else Path(cfg.model.path) / "eval_policy.json"
    write_json(out, {"model": cfg.model.path, "prompts": cfg.prompts, **result})
    save_config(cfg, out.with_suffix(".config.yaml"))
    print(format_table(result))
    print(f"wrote {out}")
    return result


def format_table(result: dict) -> str:
    head = f"{'skill':<10} {'gold':>7} {'acc':>6} {'tokens':>7} {'eos':>6} {'n':>5}"
    lines = [head, "-" * len(head)]
    for name, r in [*result["per_skill"].items(), ("all", result)]:
        lines.append(f"{name:<10} {r['gold_reward']:>7.3f} {r['accuracy']:>6.3f} "
                     f"{r['mean_tokens']:>7.1f} {r['eos_rate']:>6.3f} {r['n']:>5}")
    return "\n".join(lines)
