"""``rlhf pairs``: one preference pair per prompt from its scored responses.

Strategies (RECIPE.md, section 3): ``max_min`` (best vs worst of n, the paper's default),
``max_random`` (best vs a random other), ``max_max`` (best vs second best), ``random`` (two
random responses, the better one chosen). Ranking uses ``reward - length_penalty * length``
(the paper's lambda = 0.001 per character against verbosity). Prompts whose two selected
responses tie (e.g. all rewards equal), or whose margin is below ``min_margin``, are dropped
and counted.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import Config, save_config
from ..data.readers import iter_records
from ..data.records import Rollout
from ..errors import UserError
from ..io import write_json, write_jsonl

Strategy = Literal["max_min", "max_random", "max_max", "random"]


class SelectConfig(Config):
    strategy: Strategy = Field("max_min", description="how the chosen/rejected responses are picked")
    length_penalty: float = Field(0.0, ge=0, description="lambda in r - lambda * length (paper: 0.001 per char)")
    length_unit: Literal["chars", "tokens"] = Field("chars", description="unit of the length penalty")
    min_margin: float = Field(0.0, ge=0, description="drop pairs whose (penalised) reward gap is smaller")
    seed: int = Field(0, description="seed of the random strategies")


class PairsConfig(Config):
    input: str = Field("scored.jsonl", description="scored rollouts (records with responses and rewards)")
    out: str = Field("pairs.jsonl", description="preference pairs to write")
    select: SelectConfig = SelectConfig()


def select_pair(rewards: list[float], lengths: list[int], cfg: SelectConfig,
                rng: random.Random) -> tuple[int, int] | None:
    """(chosen index, rejected index), or None when the pair would be a tie or too close."""
    n = len(rewards)
    if n < 2:
        return None
    adj = [r - cfg.length_penalty * n_ for r, n_ in zip(rewards, lengths, strict=True)]
    by_score = sorted(range(n), key=lambda i: (-adj[i], i))  # best first, ties by index
    best = by_score[0]
    if cfg.strategy == "max_min":
        pair = (best, by_score[-1])
    elif cfg.strategy == "max_max":
        pair = (best, by_score[1])
    elif cfg.strategy == "max_random":
        pair = (best, rng.choice([i for i in range(n) if i != best]))
    else:
        a, b = rng.sample(range(n), 2)
        pair = (a, b) if (adj[a], -a) >= (adj[b], -b) else (b, a)
    gap = adj[pair[0]] - adj[pair[1]]
    if gap <= 0 or gap < cfg.min_margin:
        return None
    return pair


def build_pairs(rollouts, cfg: SelectConfig) -> tuple[list[dict], dict[str, int]]:
    """Pairs in the rollouts' order, and counts of what was kept and dropped."""
    rng = random.Random(cfg.seed)
    pairs, stats = [], {"prompts": 0, "pairs": 0, "dropped_ties": 0}
    for ro in rollouts:
        stats["prompts"] += 1
        if ro.rewards is None or len(ro.rewards) != len(ro.responses):
            raise UserError(f"rollout {ro.id!r}: needs one reward per response (run annotate first)")
        lengths = (ro.num_tokens or []) if cfg.length_unit == "tokens" else [len(r) for r in ro.responses]
        if len(lengths) != len(ro.responses):
            raise UserError(f"rollout {ro.id!r}: length_unit=tokens needs num_tokens per response")
        picked = select_pair(ro.rewards, lengths, cfg, rng)
        if picked is None:
            stats["dropped_ties"] += 1
            continue
        c, r = picked
        if ro.responses[c] == ro.responses[r]:  # equal texts scored apart (a PM's order) teach nothing
            stats["dropped_ties"] += 1
            continue
        meta = dict(ro.meta or {})
        meta.update(chosen_reward=ro.rewards[c], rejected_reward=ro.rewards[r],
                    chosen_index=c, rejected_index=r)
        pairs.append({"id": ro.id, "prompt": ro.model_dump()["prompt"], "chosen": ro.responses[c],
                      "rejected": ro.responses[r], "sampled": True, "meta": meta})
    stats["pairs"] = len(pairs)
    return pairs, stats


def run_pairs(cfg: PairsConfig) -> dict[str, int]:
    pairs, stats = build_pairs(iter_records(cfg.input, Rollout), cfg.select)
    if not pairs:
        raise UserError(f"{cfg.input}: no pair: the rewards of all {stats['prompts']} prompts tie (or differ by "
                        "less than select.min_margin)")
    out = Path(cfg.out)
    write_jsonl(out, pairs)
    write_json(out.with_suffix(".stats.json"), stats)
    save_config(cfg, out.with_suffix(".config.yaml"))
    print(f"pairs: {stats['pairs']} of {stats['prompts']} prompts ({stats['dropped_ties']} dropped as ties "
          f"or below min_margin) -> {out}")
    return stats
