"""Ranking n responses per prompt with a pairwise preference model, batched over prompts.

The paper scored rollouts with the BT model because ranking n = 8 responses with a PM
"needs many comparisons". Two modes make it practical:

- ``tournament``: a knockout finds the best with n - 1 comparisons and a second knockout in
  which the loser advances finds the worst with at most n - 1 more; the first rounds of both
  are the same matches, so they are compared once (n = 8: 7 + 3 = 10 comparisons, not 14).
  Scores are the rounds a response survived in the winners' knockout (the best is the unique
  maximum); the worst gets -1 (the unique minimum). That is what max-min pair selection needs.
- ``round_robin``: all n (n - 1) / 2 comparisons; a response's score is its mean probability
  of beating the others.

Each comparison is the PM run on both orders (two model rows). Every round of every prompt
is sent to the model as one batch, so the number of batched model calls grows with the
rounds (log2 n for the tournament), not with the prompts. ``n_calls`` counts PM rows (= 2 x
comparisons) per prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Literal

Mode = Literal["tournament", "round_robin"]
Match = tuple[int, int]
# compare([(prompt index, i, j), ...]) -> P(response i better than response j) for each
Compare = Callable[[list[tuple[int, int, int]]], list[float]]


@dataclass(frozen=True)
class Ranking:
    scores: list[float]
    n_calls: int  # PM rows run for this prompt (two per comparison)
    best: int
    worst: int


def rank(compare: Compare, sizes: list[int], mode: Mode = "tournament") -> list[Ranking]:
    """Rank ``sizes[k]`` responses of each prompt k; each round of all prompts is one call
    of ``compare``."""
    if mode not in _MODES:
        raise ValueError(f"unknown ranking mode {mode!r}; valid: {', '.join(_MODES)}")
    gens = [_MODES[mode](n) for n in sizes]
    asks: dict[int, list[Match]] = {}
    results: dict[int, list[float]] = {}
    calls = [0] * len(sizes)

    def advance(k: int, answer: list[float] | None) -> None:
        try:
            asks[k] = gens[k].send(answer)
        except StopIteration as stop:
            results[k] = stop.value
            asks.pop(k, None)

    for k in range(len(gens)):
        advance(k, None)
    while asks:
        flat = [(k, i, j) for k, matches in asks.items() for i, j in matches]
        probs = compare(flat)
        at = 0
        for k, matches in list(asks.items()):
            calls[k] += 2 * len(matches)
            advance(k, probs[at : at + len(matches)])
            at += len(matches)
    out = []
    for k in range(len(sizes)):
        s = results[k]
        out.append(
            Ranking(
                s,
                calls[k],
                max(range(len(s)), key=s.__getitem__),
                min(range(len(s)), key=s.__getitem__),
            )
        )
    return out


def rank_with_pm(
    model,
    tokenizer,
    prompts: list[list[dict]],
    responses: list[list[str]],
    mode: Mode = "tournament",
    batch_size: int = 32,
    max_length: int = 3072,
    progress: bool = False,
) -> list[Ranking]:
    """Rank the responses of each prompt (messages) with a PM (see :mod:`.pm`)."""
    from .pm import compare as pm_compare

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")

    def compare(items: list[tuple[int, int, int]]) -> list[float]:
        return pm_compare(
            model,
            tokenizer,
            [(prompts[k], responses[k][i], responses[k][j]) for k, i, j in items],
            batch_size,
            max_length,
            progress,
        ).probs

    return rank(compare, [len(r) for r in responses], mode)


# --------------------------------------------------------------------------- modes
# A mode is a generator per prompt: it yields the matches it needs next, receives their
# probabilities, and returns the scores.


def _tournament(n: int) -> Generator[list[Match], list[float], list[float]]:
    p: dict[Match, float] = {}  # P(i beats j) of compared matches
    up, down = list(range(n)), list(range(n))  # winners advance in `up`, losers in `down`
    survived = [0.0] * n
    while len(up) > 1 or len(down) > 1:
        need = [m for m in dict.fromkeys(_pairs(up) + _pairs(down)) if m not in p]
        if need:
            p.update(zip(need, (yield need), strict=True))
        up = _next_round(up, p, keep_winner=True)
        down = _next_round(down, p, keep_winner=False)
        for i in up:
            survived[i] += 1
    if n > 1:
        survived[down[0]] = -1.0
    return survived


def _round_robin(n: int) -> Generator[list[Match], list[float], list[float]]:
    matches = [(i, j) for i in range(n) for j in range(i + 1, n)]
    wins = [0.0] * n
    if matches:
        for (i, j), q in zip(matches, (yield matches), strict=True):
            wins[i] += q
            wins[j] += 1.0 - q
    return [w / max(n - 1, 1) for w in wins]


def _pairs(alive: list[int]) -> list[Match]:
    return [(alive[k], alive[k + 1]) for k in range(0, len(alive) - 1, 2)] if len(alive) > 1 else []


def _next_round(alive: list[int], p: dict[Match, float], keep_winner: bool) -> list[int]:
    """Who goes on: the winner (or loser) of each match; an odd one out gets a bye.
    A probability of exactly 0.5 counts as a win for the first of the two."""
    if len(alive) < 2:
        return alive
    nxt = []
    for i, j in _pairs(alive):
        first_wins = p[(i, j)] >= 0.5
        nxt.append(i if first_wins == keep_winner else j)
    if len(alive) % 2:
        nxt.append(alive[-1])
    return nxt


_MODES = {"tournament": _tournament, "round_robin": _round_robin}
