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


def test_the_loops_win_rate_reads_stored_rewards_of_the_same_judge_only(tmp_path, monkeypatch):
    """The held-out evaluation keeps each sample's judge reward; a later policy's win rate
    against those samples takes the baseline's rewards from the file when the same judge (the
    same settings) wrote them, and scores both sides again when another did."""
    from rlhf_workflow.data.records import Prompt
    from rlhf_workflow.evaluation import iteration, winrate
    from rlhf_workflow.generation.sampling import Sample
    from rlhf_workflow.online.annotate import AnnotatorConfig

    judge, cfg = AnnotatorConfig(path="nowhere/rm"), iteration.HeldOutConfig(prompts="unused", winrate=True)
    prompts = [Prompt(prompt="a", id="0"), Prompt(prompt="b", id="1")]
    base = tmp_path / "sft_samples.jsonl"
    iteration._win_rate(prompts, [[Sample("x", "stop", 0)], [Sample("yyy", "stop", 0)]], [[0.0], [1.0]], judge, cfg,
                        0, str(base), None)
    assert [json.loads(x)["rewards"] for x in base.read_text().splitlines()] == [[0.0], [1.0]]
    calls = []
    monkeypatch.setattr(winrate, "preferences", lambda *a: calls.append(a) or [[0.5], [0.5]])
    samples = [[Sample("xx", "stop", 0)], [Sample("y", "stop", 0)]]
    got = iteration._win_rate(prompts, samples, [[2.0], [0.0]], judge, cfg, 0, None, str(base))
    sigmoid = [1 / (1 + math.exp(-z)) for z in (2.0 - 0.0, 0.0 - 1.0)]
    assert got["win_rate"] == pytest.approx(sum(sigmoid) / 2) and not calls
    other = judge.model_copy(update={"max_length": 512})
    assert iteration._win_rate(prompts, samples, [[2.0], [0.0]], other, cfg, 0, None, str(base))["win_rate"] == 0.5
    assert len(calls) == 1
