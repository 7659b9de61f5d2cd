"""Held-out accuracy of a judge trainer's test pairs, counted as RewardBench counts a pair (a
tie scores 0), overall and per subset: what `rm train` and `pm train` log and write."""

from __future__ import annotations

from ..evaluation.rewardbench import NO_SUBSET, pair_credit, subset_accuracy


def held_out_accuracies(subsets: list[str | None], diffs: list[float]) -> dict:
    """``accuracy`` (a tie counts 0, as RewardBench counts it), ``ties``, and ``accuracy/SUBSET``."""
    per = subset_accuracy(subsets, diffs)
    out = {"accuracy": sum(pair_credit(d) for d in diffs) / len(diffs), "ties": sum(d == 0 for d in diffs)}
    out.update({f"accuracy/{s}": v["accuracy"] for s, v in sorted(per.items()) if s != NO_SUBSET})
    return out
