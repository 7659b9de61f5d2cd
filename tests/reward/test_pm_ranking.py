"""Ranking n responses with pairwise comparisons: knockout tournament and round robin."""

import math
import random

import pytest

from rlhf_workflow.reward.ranking import rank, rank_with_pm


class SyntheticScorer:
    """P(i beats j) = sigmoid(true_k[i] - true_k[j]) for prompt k; counts batched calls."""

    def __init__(self, true: list[list[float]]):
        self.true, self.batches, self.comparisons = true, 0, 0

    def __call__(self, items):
        self.batches += 1
        self.comparisons += len(items)
        return [1 / (1 + math.exp(self.true[k][j] - self.true[k][i])) for k, i, j in items]


def _true_orders(seed=0, sizes=range(1, 10)):
    rng = random.Random(seed)
    return [rng.sample(range(100), n) for n in sizes for _ in range(3)]


def test_tournament_finds_the_true_best_and_worst():
    true = _true_orders()
    scorer = SyntheticScorer(true)
    out = rank(scorer, [len(t) for t in true], "tournament")
    for t, r in zip(true, out, strict=True):
        n = len(t)
        assert r.best == t.index(max(t)) and r.worst == t.index(min(t))
        assert max(r.scores) == r.scores[r.best] and r.scores.count(max(r.scores)) == 1
        if n > 1:
            assert min(r.scores) == r.scores[r.worst] and r.scores.count(min(r.scores)) == 1
        # n - 1 comparisons for the best, n - 1 for the worst, the first round shared
        assert r.n_calls == 2 * (2 * (n - 1) - n // 2)
    # every round of every prompt is one batch: ceil(log2 9) = 4 rounds
    assert scorer.batches == 4
    assert scorer.comparisons == sum(r.n_calls for r in out) // 2


def test_tournament_for_eight_responses_needs_ten_comparisons():
    r = rank(SyntheticScorer([[3, 1, 4, 1.5, 5, 9, 2, 6]]), [8])[0]
    assert (r.best, r.worst, r.n_calls) == (5, 1, 20)


def test_round_robin_scores_are_mean_win_probabilities():
    true = _true_orders(1, sizes=(2, 5, 8))
    scorer = SyntheticScorer(true)
    out = rank(scorer, [len(t) for t in true], "round_robin")
    assert scorer.batches == 1
    for t, r in zip(true, out, strict=True):
        n = len(t)
        assert r.n_calls == n * (n - 1)
        assert sorted(range(n), key=r.scores.__getitem__) == sorted(range(n), key=t.__getitem__)
        assert sum(r.scores) == pytest.approx(n / 2)  # each match hands out one unit of wins
        assert (r.best, r.worst) == (t.index(max(t)), t.index(min(t)))


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown ranking mode"):
        rank(SyntheticScorer([[1, 2]]), [2], "swiss")


def test_rank_with_a_trained_pm(trained_pm):
    """Round robin's scores are the PM's own order-averaged win probabilities, computed here
    pair by pair; the tournament makes its bracket's number of comparisons."""
    from rlhf_workflow.reward.pm import compare, load_preference_model

    model, tok = load_preference_model(trained_pm)
    prompts = [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "user", "content": "Sort: 2 1"}],
    ]
    responses = [
        ["Answer: 5", "Answer: 6", "Let me think about it. Answer: 5", "Answer: 4"],
        ["Answer: 1 2", "Answer: 2 1", "I will work it out. Answer: 1 2"],
    ]
    for mode in ("tournament", "round_robin"):
        out = rank_with_pm(model, tok, prompts, responses, mode=mode)
        assert [len(r.scores) for r in out] == [4, 3]
        assert [r.n_calls for r in out] == ([2 * 4, 2 * 3] if mode == "tournament" else [12, 6])
    for p, rs, r in zip(prompts, responses, out, strict=True):  # (out: round robin's)
        n = len(rs)
        direct = [sum(compare(model, tok, [(p, rs[i], rs[j])]).probs[0] for j in range(n) if j != i) / (n - 1)
                  for i in range(n)]
        assert r.scores == pytest.approx(direct, abs=1e-6)  # (this tiny PM's scores differ by ~1e-4)
