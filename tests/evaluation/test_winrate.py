"""The win rate and its length-controlled fit on hand-built cases where the answer is known,
and `rlhf eval winrate` end to end on tiny models with a judge that only counts characters."""

import json
import math

import pytest
import torch

from rlhf_workflow.cli import main
from rlhf_workflow.evaluation.winrate import lc_win_rate, win_rates
from rlhf_workflow.models.tiny import InitModelConfig, init_model


def _lengths(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * 40 + 25).tolist()  # the policy mostly longer


def _x(d):
    d = torch.tensor(d, dtype=torch.float64)
    return torch.tanh(d / d.std())


def test_a_judge_that_prefers_only_length_has_an_lc_win_rate_of_one_half():
    d = _lengths()
    prefs = torch.sigmoid(3.0 * _x(d)).tolist()
    assert sum(prefs) / len(prefs) > 0.65  # the raw win rate rewards the longer policy
    assert lc_win_rate(prefs, d) == pytest.approx(0.5, abs=1e-6)


def test_a_judge_blind_to_length_keeps_its_raw_win_rate():
    d = _lengths()
    assert lc_win_rate([0.7] * len(d), d) == pytest.approx(0.7, abs=1e-6)
    prefs = torch.sigmoid(0.4 + 2.0 * _x(d)).tolist()  # both: LC is the preference at equal length
    assert lc_win_rate(prefs, d) == pytest.approx(1 / (1 + math.exp(-0.4)), abs=1e-6)


def test_standard_errors_by_bootstrap_over_prompts():
    """Prompts whose samples agree: the SE is that of a mean over prompts, not over samples."""
    prefs = [[1.0, 1.0], [0.0, 0.0]] * 50  # 100 prompts, half won
    r = win_rates(prefs, [[0.0, 0.0]] * 100, bootstrap=2000, seed=0)
    assert r["win_rate"] == 0.5 and r["lc_win_rate"] == pytest.approx(0.5, abs=1e-9)
    assert r["win_rate_se"] == pytest.approx(math.sqrt(0.25 / 100), rel=0.1)


def chars(record, responses):
    return [float(len(r)) for r in responses]


def test_eval_winrate_end_to_end_with_a_length_judge(tiny_model, sandbox_data, tmp_path):
    other = tmp_path / "other"
    init_model(InitModelConfig(out=str(other), hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                               vocab_size=600, seed=1))
    out = tmp_path / "wr"
    assert main(["eval", "winrate", f"policy.path={tiny_model}", f"baseline.path={other}",
                 "judge.kind=function", f"judge.function={__name__}:chars",
                 f"prompts={sandbox_data / 'prompts_eval.jsonl'}", "limit=30", "sampling.n=4",
                 "sampling.max_new_tokens=24", "bootstrap=200", f"out={out}"]) == 0
    result = json.loads((out / "winrate.json").read_text())
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().split("\n") if x]
    assert len(rows) == 120 and result["prompts"] == 30
    hand = [0.5 + 0.5 * ((len(r["policy"]) > len(r["baseline"])) - (len(r["policy"]) < len(r["baseline"])))
            for r in rows]
    assert [r["preference"] for r in rows] == hand
    assert result["win_rate"] == pytest.approx(sum(hand) / len(hand))
    assert result["lc_win_rate"] == pytest.approx(0.5, abs=0.05)  # only length moves this judge
