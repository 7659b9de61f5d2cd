"""``rlhf eval policy``: sample from a policy on sandbox prompts and score with the gold reward.

Writes, into a folder of its own (default ``runs/eval_policy/<model path>``, never inside the
model folder): ``metrics.json`` (gold reward, accuracy, length and EOS rate, overall and per
skill), ``samples.jsonl`` (one line per sample: prompt, response, parsed answer, the gold
answer and verdict) and the resolved ``config.yaml``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
from pydantic import Field

from ..config import Config, ModelConfig, save_config
from ..data.readers import iter_rows, read_records
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
    baseline: str | None = Field(
        None, description="the folder of another `rlhf eval policy` on the same prompts: the gold reward's "
        "difference to it, paired by prompt, with its standard error")


def gold_by_prompt(prompts: list[Prompt], samples: list[list[Sample]]) -> list[list[float]]:
    """The gold reward of each sample, a list per prompt."""
    return [[gold_reward(p.meta, s.text, ended=s.finish_reason == "stop").reward for s in group]
            for p, group in zip(prompts, samples, strict=True)]


def clustered_se(groups: list[list[float]]) -> float:
    """Standard error of the mean of all values, clustered by group: a prompt's samples share the
    prompt, so they are not independent, and the per-sample error understates the per-prompt
    one. ``sqrt(G / (G - 1) * sum_g (sum_i (y_gi - mean))^2) / N``; with equal groups, the standard
    deviation of the group means over ``sqrt(G)``."""
    n = sum(len(g) for g in groups)
    if len(groups) < 2:
        return float("nan")
    mean = sum(map(sum, groups)) / n
    spread = sum((sum(g) - len(g) * mean) ** 2 for g in groups)
    return math.sqrt(len(groups) / (len(groups) - 1) * spread) / n


def paired_difference(a: list[list[float]], b: list[list[float]]) -> dict:
    """Two policies on the same prompts (in the same order): the mean over prompts of the
    difference of their per-prompt means, and its standard error."""
    d = [sum(x) / len(x) - sum(y) / len(y) for x, y in zip(a, b, strict=True)]
    return {"diff": sum(d) / len(d), "se": clustered_se([[v] for v in d]), "prompts": len(d)}


def gold_metrics(prompts: list[Prompt], samples: list[list[Sample]]) -> dict:
    """Gold reward (with its standard error clustered by prompt), accuracy, length and EOS
    rate, overall and per skill."""
    rows = []
    for k, (p, group) in enumerate(zip(prompts, samples, strict=True)):
        for s in group:
            g = gold_reward(p.meta, s.text, ended=s.finish_reason == "stop")
            rows.append((p.meta["skill"], g.reward, g.correct, s.num_tokens, len(s.text), s.finish_reason == "stop", k))

    def summary(rs: list) -> dict:
        n = len(rs)
        by_prompt = defaultdict(list)
        for r in rs:
            by_prompt[r[6]].append(r[1])
        return {
            "gold_reward": sum(r[1] for r in rs) / n,
            "gold_reward_se": clustered_se(list(by_prompt.values())),
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
    if cfg.baseline:
        result["against_baseline"] = {"baseline": cfg.baseline, **_against(records, Path(cfg.baseline))}
    write_jsonl(out / "samples.jsonl", records)
    write_json(out / "metrics.json", {"model": cfg.model.path, "prompts": cfg.prompts, **result})
    save_config(cfg, out / "config.yaml")
    print(format_table(result))
    if cfg.baseline:
        d = result["against_baseline"]
        print(f"gold against {cfg.baseline}: {d['diff']:+.3f} +- {d['se']:.3f} (paired by prompt, "
              f"{d['prompts']} prompts)")
    print(f"eval policy: metrics.json and samples.jsonl ({len(records)} samples) -> {out}")
    return result


def _against(records: list[dict], baseline: Path) -> dict:
    """The gold difference of these samples to a baseline evaluation's, paired by prompt."""
    path = baseline / "samples.jsonl"
    if not path.is_file():
        raise UserError(f"baseline={baseline}: no samples.jsonl (give the folder of an `rlhf eval policy`)")
    (ids, golds), (base_ids, base) = _by_prompt(records), _by_prompt(row for _, row in iter_rows(path))
    if ids != base_ids:
        raise UserError(f"baseline={baseline} was evaluated on other prompts ({len(base_ids)} against "
                        f"{len(ids)}, or in another order): use the same prompts and limit")
    return paired_difference(golds, base)


def _by_prompt(records) -> tuple[list, list[list[float]]]:
    """Sample records (as ``samples.jsonl`` has them) as (prompt ids, gold rewards per prompt)."""
    ids, golds = [], []
    for r in records:
        if r["sample"] == 0:
            ids.append(r["id"])
            golds.append([])
        golds[-1].append(r["gold_reward"])
    return ids, golds


def format_table(result: dict) -> str:
    head = f"{'skill':<10} {'gold':>7} {'+- se':>6} {'acc':>6} {'tokens':>7} {'eos':>6} {'n':>5}"
    lines = [head, "-" * len(head)]
    for name, r in [*result["per_skill"].items(), ("all", result)]:
        lines.append(f"{name:<10} {r['gold_reward']:>7.3f} {r['gold_reward_se']:>6.3f} {r['accuracy']:>6.3f} "
                     f"{r['mean_tokens']:>7.1f} {r['eos_rate']:>6.3f} {r['n']:>5}")
    return "\n".join(lines)
