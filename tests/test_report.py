"""`rlhf report` on hand-made summaries: the tables carry the numbers given, the plots drawn
are the ones the data supports, a loop run and a stage directory are reported too."""

import json

import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.errors import UserError
from rlhf_workflow.report import ReportConfig, render_markdown, run_report

SFT = {"iteration": 0, "gold_reward": 0.3, "accuracy": 0.5, "rm_reward": -1.0, "mean_tokens": 12.0,
       "eos_rate": 1.0, "kl": 0.0}


def _it(t, gold, rm=None, **kw):
    return {**SFT, "iteration": t, "gold_reward": gold, "rm_reward": rm, "kl": 0.5 * t, "pairs": 90 + t,
            "chosen_gold": 0.4, "best_gold": 0.7, "seconds": {"generate": 3.0, "annotate": 4.0, "dpo": 5.0}, **kw}


SUMMARY = {
    "policies": {"sft": SFT, "offline_dpo": {**SFT, "gold_reward": 0.35, "kl": 0.2}},
    "runs": {"online": [SFT, _it(1, 0.25, rm=0.5), _it(2, 0.125, rm=1.5, gold_reward_se=0.0625, gold_vs_baseline=-0.175,
                                                             gold_vs_baseline_se=0.03)],
             "online_pm_judge": [SFT, _it(1, 0.375), _it(2, 0.4375)]},
    "reward_models": {"BT vs gold": {"per_subset": {"chat": {"accuracy": 0.95}, "reasoning": {"accuracy": 0.75}},
                                     "accuracy": 0.85}},
    "claims": ["a claim"],
}


def test_tables_carry_the_numbers_and_plots_follow_the_data(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    run_report(ReportConfig(run_dir=str(tmp_path)))
    md = (tmp_path / "report.md").read_text()
    assert "| online iter 2 | 0.125 +- 0.062 | -0.175 +- 0.030 | 0.500 | 1.500 | 12.0 | 1.000 | 1.000 |" in md
    assert "| online_pm_judge iter 1 | 0.375 | - | 0.500 | - |" in md  # a PM gives no absolute reward
    assert "| 2 | 92 | - | - | 0.400 | 0.700 | 3 | 4 | 5 |" in md  # the winner's curse columns
    assert "| BT vs gold | 0.950 | 0.750 | 0.850 |" in md and "- a claim" in md
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["gold_reward.png", "judge_vs_gold.png", "kl_vs_gold.png", "length.png", "rm_accuracy.png",
                     "rm_reward.png"]
    assert "<table>" in (tmp_path / "report.html").read_text()


def test_without_judge_rewards_there_is_no_over_optimisation_plot():
    runs = {"online_pm_judge": SUMMARY["runs"]["online_pm_judge"]}
    md = render_markdown({"runs": runs, "policies": {}}, [])
    assert "online_pm_judge iter 2" in md and "## Plots" not in md


def test_a_loop_run_and_a_stage_directory(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"iterations": [SFT, _it(1, 0.25, rm=0.5)]}))
    assert main(["report", str(tmp_path)]) == 0  # the run folder as a bare word, as the README writes it
    assert "| online iter 1 | 0.250 |" in (tmp_path / "report.md").read_text()
    stage = tmp_path / "stage"
    stage.mkdir()
    with pytest.raises(UserError, match="no summary.json and no manifest.json"):
        run_report(ReportConfig(run_dir=str(stage)))
