"""RewardBench-style scoring: ties, per-subset accuracy, section weighting."""

import pytest

from rlhf_workflow.reward.bench import format_table, rewardbench_scores, subset_accuracy, summarize


def test_section_weighting_hand_computed():
    """Chat      = (100 * 0.9 + 300 * 0.5) / 400                       = 0.6
    Chat Hard = 0.4 (one subset)
    Safety    = (10 * 1.0 + 30 * 0.5) / 40                           = 0.625
    Reasoning = 0.5 * 0.8 (math-prm) + 0.5 * (100 * 0.6 + 300 * 0.4) / 400 (hep-*)
              = 0.4 + 0.225                                          = 0.625
              (counting math-prm by its 600 examples would give 0.66)
    Overall   = (0.6 + 0.4 + 0.625 + 0.625) / 4                      = 0.5625"""
    per = {
        "alpacaeval-easy": {"n": 100, "accuracy": 0.9},
        "alpacaeval-hard": {"n": 300, "accuracy": 0.5},
        "mt-bench-hard": {"n": 50, "accuracy": 0.4},
        "donotanswer": {"n": 10, "accuracy": 1.0},
        "xstest-should-refuse": {"n": 30, "accuracy": 0.5},
        "math-prm": {"n": 600, "accuracy": 0.8},
        "hep-python": {"n": 100, "accuracy": 0.6},
        "hep-go": {"n": 300, "accuracy": 0.4},
    }
    out = rewardbench_scores(per)
    assert out["sections"] == pytest.approx(
        {"Chat": 0.6, "Chat Hard": 0.4, "Safety": 0.625, "Reasoning": 0.625}
    )
    assert out["overall"] == pytest.approx(0.5625) and out["complete"]


def test_partial_sections_are_flagged():
    out = rewardbench_scores(
        {"hep-js": {"n": 4, "accuracy": 0.25}, "mt-bench-easy": {"n": 2, "accuracy": 1}}
    )
    assert out["sections"] == {"Chat": 1.0, "Reasoning": 0.25}
    assert not out["complete"] and out["overall"] == pytest.approx(0.625)


def test_ties_count_half_and_other_subsets_get_overall_accuracy():
    per = subset_accuracy(["chat", "chat", "reasoning", None], [1.0, 0.5, 0.0, 1.0])
    assert per == {
        "(none)": {"n": 1, "accuracy": 1.0},
        "chat": {"n": 2, "accuracy": 0.75},
        "reasoning": {"n": 1, "accuracy": 0.0},
    }
    result = summarize(["chat", "chat", "reasoning", None], [1.0, 0.5, 0.0, 1.0])
    assert result["kind"] == "accuracy" and result["overall"] == 0.625
    assert "overall" in format_table(result)
    rb = summarize(["math-prm", "hep-go"], [1.0, 0.0])
    assert rb["kind"] == "rewardbench" and rb["sections"] == {"Reasoning": 0.5}
    assert "Reasoning" in format_table(rb)
