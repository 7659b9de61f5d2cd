"""RewardBench-style evaluation of a BT reward model (``rlhf rm eval``) or a pairwise
preference model (``rlhf pm eval``) on a pair file with an optional ``subset`` field.

A pair is won when the model prefers the chosen response (BT: ``r(chosen) > r(rejected)``;
PM: order-averaged ``P(chosen > rejected) > 0.5``); ties count half. Accuracy is reported
per subset; when every subset is one of RewardBench's, the four section scores and the
overall score follow RECIPE.md (see :func:`rewardbench_scores`), else the overall accuracy
over all pairs. A table goes to the terminal, the full result to JSON.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from ..config import Config, ModelConfig
from ..distributed import rank_and_world
from ..io import write_json
from .bt import _fmt_counts, _load_for_scoring, encode_pair, read_pairs, score_tokenized

SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": (
        "alpacaeval-easy",
        "alpacaeval-length",
        "alpacaeval-hard",
        "mt-bench-easy",
        "mt-bench-med",
    ),
    "Chat Hard": (
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ),
    "Safety": (
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
NO_SUBSET = "(none)"


class _EvalConfig(Config):
    input: str = Field(
        "allenai/reward-bench",
        description="pairs (prompt, chosen, rejected, subset?): file or hub dataset",
    )
    split: str = Field("filtered", description="split, for hub datasets")
    out: str | None = Field(
        None, description="JSON result file (default: print the JSON after the table)"
    )
    batch_size: int = Field(32, ge=1, description="sequences per forward pass")
    on_bad: Literal["error", "skip"] = Field(
        "error", description="invalid pair: fail or skip and count"
    )
    progress: bool = Field(True, description="show a progress bar")


class RMEvalConfig(_EvalConfig):
    model: ModelConfig = ModelConfig(path="runs/rm/model")
    max_length: int = Field(2048, ge=16, description="tokens per sequence (prompt + response)")
    max_prompt_length: int | None = Field(
        None, ge=1, description="prompt tokens kept when too long (default max_length // 2)"
    )


class PMEvalConfig(_EvalConfig):
    model: ModelConfig = ModelConfig(path="runs/pm/model")
    max_length: int = Field(
        3072, ge=16, description="tokens per comparison (context + both responses)"
    )


# --------------------------------------------------------------------------- scoring


def subset_accuracy(subsets: list[str | None], outcomes: list[float]) -> dict[str, dict]:
    """``{subset: {"n", "accuracy"}}`` from per-pair outcomes (1 win, 0.5 tie, 0 loss)."""
    acc: dict[str, list[float]] = {}
    for s, o in zip(subsets, outcomes, strict=True):
        acc.setdefault(s or NO_SUBSET, []).append(o)
    return {s: {"n": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(acc.items())}


def rewardbench_scores(per_subset: dict[str, dict]) -> dict:
    """Section scores and the overall score from ``{subset: {"n", "accuracy"}}``.

    A section score is the example-count-weighted mean of its subsets' accuracies, except
    Reasoning, where ``math-prm`` weighs as much as all ``hep-*`` subsets together:
    ``0.5 * acc(math-prm) + 0.5 * weighted mean(hep-*)``. The overall score is the plain mean
    of the four sections. Sections (or halves of Reasoning) without data are left out and
    ``complete`` says whether all four were there.
    """
    sections = {}
    for name, members in SECTIONS.items():
        if name == "Reasoning":
            parts = [_weighted(per_subset, ("math-prm",)), _weighted(per_subset, members[1:])]
            parts = [p for p in parts if p is not None]
            value = sum(parts) / len(parts) if parts else None
        else:
            value = _weighted(per_subset, members)
        if value is not None:
            sections[name] = value
    overall = sum(sections.values()) / len(sections) if sections else None
    return {"sections": sections, "overall": overall, "complete": len(sections) == len(SECTIONS)}


def _weighted(per_subset: dict[str, dict], members: tuple[str, ...]) -> float | None:
    rows = [per_subset[m] for m in members if m in per_subset]
    n = sum(r["n"] for r in rows)
    return sum(r["n"] * r["accuracy"] for r in rows) / n if n else None


def summarize(subsets: list[str | None], outcomes: list[float]) -> dict:
    """Per-subset accuracy plus RewardBench sections when every subset is RewardBench's,
    otherwise the overall accuracy over all pairs."""
    per = subset_accuracy(subsets, outcomes)
    known = {s for members in SECTIONS.values() for s in members}
    result: dict = {"n": len(outcomes), "subsets": per}
    if set(per) <= known:
        result.update(rewardbench_scores(per), kind="rewardbench")
    else:
        result.update(overall=sum(outcomes) / len(outcomes), kind="accuracy")
    return result


def format_table(result: dict) -> str:
    lines = [f"{'subset':<24} {'n':>6} {'accuracy':>9}"]
    lines += [
        f"{s:<24} {r['n']:>6} {100 * r['accuracy']:>8.1f}%" for s, r in result["subsets"].items()
    ]
    if result["kind"] == "rewardbench":
        lines.append("")
        lines += [f"{name:<24} {'':>6} {100 * v:>8.1f}%" for name, v in result["sections"].items()]
        note = "" if result["complete"] else "  (mean of the sections present)"
    else:
        note = "  (all pairs)"
    if result["overall"] is not None:
        lines.append(f"{'overall':<24} {result['n']:>6} {100 * result['overall']:>8.1f}%{note}")
    return "\n".join(lines)


def _wins(diffs: list[float]) -> list[float]:
    return [1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs]


# --------------------------------------------------------------------------- commands


def run_rm_eval(cfg: RMEvalConfig) -> dict:
    rows, skipped = read_pairs(cfg.input, cfg.split, cfg.on_bad)
    model, tokenizer = _load_for_scoring(cfg.model)
    toks = [encode_pair(tokenizer, r.pair, cfg.max_length, cfg.max_prompt_length) for r in rows]
    seqs = [t.chosen for t in toks] + [t.rejected for t in toks]
    r = score_tokenized(model, seqs, tokenizer.pad_token_id, cfg.batch_size, cfg.progress, shard=True)
    n = len(rows)
    outcomes = _wins([c - j for c, j in zip(r[:n], r[n:], strict=True)])
    return _report(cfg, rows, outcomes, skipped, sum(t.truncated for t in toks))


def run_pm_eval(cfg: PMEvalConfig) -> dict:
    from .pm import _compare, load_preference_model

    rows, skipped = read_pairs(cfg.input, cfg.split, cfg.on_bad)
    model, tokenizer = load_preference_model(cfg.model.path, cfg.model.dtype)
    items = []
    for row in rows:
        prompt, chosen, rejected = row.pair.conversations()
        items.append((prompt, chosen[-1]["content"], rejected[-1]["content"]))
    probs, _, truncated = _compare(
        model, tokenizer, items, cfg.batch_size, cfg.max_length, cfg.progress, shard=True
    )
    return _report(cfg, rows, _wins([p - 0.5 for p in probs]), skipped, truncated)


def _report(cfg: _EvalConfig, rows, outcomes: list[float], skipped, truncated: int) -> dict:
    result = summarize([r.pair.subset for r in rows], outcomes)
    result.update(
        model=cfg.model.path, input=cfg.input, truncated=truncated, skipped_invalid=dict(skipped)
    )
    if rank_and_world()[0] != 0:  # every rank scored its share; one reports
        return result
    print(format_table(result))
    extra = f"{truncated} pairs truncated to max_length {cfg.max_length}"
    print(extra + (f"; skipped invalid: {_fmt_counts(skipped)}" if skipped else ""))
    if cfg.out:
        write_json(cfg.out, result)
        print(f"-> {cfg.out}")
    else:
        print(json.dumps(result))
    return result
