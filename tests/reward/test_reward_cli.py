"""`rlhf rm train / rm eval` and `rlhf pm train / pm eval` on the sandbox, end to end."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_workflow.cli import main


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rm_train_eval_score(tiny_model, sandbox_data, small_prefs, tmp_path, capsys):
    out = tmp_path / "rm"
    code = main(
        [
            "rm",
            "train",
            f"model.path={tiny_model}",
            f"data.train={small_prefs[0]}",
            f"data.test={sandbox_data / 'prefs_test.jsonl'}",
            "data.max_length=128",
            "optim.lr=1e-3",
            "train.max_steps=6",
            "train.global_batch_size=8",
            "train.eval_every=3",
            "train.log_every=5",
            f"train.output_dir={out}",
            "train.progress=false",
        ]
    )
    assert code == 0
    evals = [m for m in _metrics(out) if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [3, 6]  # during and after training
    result = json.loads((out / "eval.json").read_text())
    assert result["accuracy"] == evals[-1]["eval/accuracy"]
    assert {"accuracy/chat", "accuracy/reasoning"} <= set(result)
    # a plain transformers reload works and knows its dedicated pad token
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id

    capsys.readouterr()
    assert (
        main(
            [
                "rm",
                "eval",
                f"model.path={out / 'model'}",
                "--in",
                str(sandbox_data / "prefs_test.jsonl"),
                "--out",
                str(tmp_path / "eval.json"),
                "progress=false",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "reasoning" in table and "overall" in table
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["overall"] == result["accuracy"] and ev["kind"] == "accuracy"
    assert ev["subsets"]["chat"]["accuracy"] == result["accuracy/chat"]

    rollouts = tmp_path / "rollouts.jsonl"  # scored by `rlhf annotate`, the one scoring path
    rollouts.write_text(
        json.dumps({"id": "a", "prompt": "What is 2 + 3?", "meta": {"k": 1},
                    "responses": ["Answer: 5", "Let me think about it. Answer: 6", "Answer: 5"]}) + "\n"
        + json.dumps({"id": "b", "prompt": [{"role": "user", "content": "Sort: 2 1"}], "responses": ["Answer: 1 2"]})
        + "\n"
    )
    scored = tmp_path / "scored.jsonl"
    judge = ["annotator.kind=bt", f"annotator.path={out / 'model'}", "annotator.batch_size=2"]
    assert main(["annotate", "--in", str(rollouts), "--out", str(scored), *judge]) == 0
    capsys.readouterr()
    recs = [json.loads(line) for line in scored.read_text().splitlines()]
    assert recs[0]["id"] == "a" and recs[0]["meta"] == {"k": 1} and len(recs[0]["rewards"]) == 3
    assert recs[0]["rewards"][0] == pytest.approx(recs[0]["rewards"][2]) and recs[0]["rewards"][0] != recs[0]["rewards"][1]
    assert len(recs[1]["rewards"]) == 1

    rollouts.write_text(json.dumps({"prompt": "q", "responses": ["ok", 3]}) + "\n")
    assert main(["annotate", "--in", str(rollouts), "--out", str(tmp_path / "bad.jsonl"), *judge]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: ") and "rollouts.jsonl, line 1: field 'responses.1'" in err
    assert not (tmp_path / "bad.jsonl").exists()


def test_pm_train_eval(tiny_model, sandbox_data, small_prefs, tmp_path, capsys):
    out = tmp_path / "pm"
    code = main(
        [
            "pm",
            "train",
            f"model.path={tiny_model}",
            f"data.train={small_prefs[0]}",
            f"data.test={sandbox_data / 'prefs_test.jsonl'}",
            "data.max_length=256",
            "optim.lr=1e-3",
            "train.max_steps=6",
            "train.global_batch_size=8",
            "train.eval_every=3",
            f"train.output_dir={out}",
            "train.progress=false",
        ]
    )
    assert code == 0
    assert [m["step"] for m in _metrics(out) if "eval/accuracy" in m] == [3, 6]
    capsys.readouterr()
    assert (
        main(
            [
                "pm",
                "eval",
                f"model.path={out / 'model'}",
                "--in",
                str(sandbox_data / "prefs_test.jsonl"),
                "--out",
                str(tmp_path / "pm.json"),
                "progress=false",
            ]
        )
        == 0
    )
    assert "overall" in capsys.readouterr().out
    ev = json.loads((tmp_path / "pm.json").read_text())
    assert ev["overall"] == json.loads((out / "eval.json").read_text())["accuracy"]


def test_rm_eval_reports_rewardbench_sections(trained_rm, tmp_path, capsys):
    pairs = tmp_path / "rb.jsonl"
    rows = [
        ("mt-bench-easy", "Answer: 5", "Answer: 6"),
        ("llmbar-natural", "Answer: 5", "Answer: 4"),
        ("donotanswer", "I will not help.", "Sure."),
        ("math-prm", "Answer: 5", "Answer: 7"),
        ("hep-python", "Answer: 5", "Answer: 8"),
    ]
    pairs.write_text(
        "".join(
            json.dumps({"prompt": "What is 2 + 3?", "chosen": c, "rejected": r, "subset": s}) + "\n"
            for s, c, r in rows
        )
    )
    assert (
        main(["rm", "eval", f"model.path={trained_rm}", "--in", str(pairs), "progress=false"]) == 0
    )
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["kind"] == "rewardbench" and result["complete"]
    assert set(result["sections"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    assert "Chat Hard" in out


@pytest.mark.parametrize("kind", ["rm", "pm"])
def test_micro_batches_by_tokens_train_as_by_pairs(kind, judge_cfg, tmp_path):
    """The same pairs a step, in micro-batches of at most 600 tokens (the BT model's shared-prompt
    pairs packed several to a row, the PM's comparisons a row each): the same losses and model."""
    from safetensors.torch import load_file

    from rlhf_workflow.reward.bt import run_rm_train
    from rlhf_workflow.reward.pm import run_pm_train

    run = run_rm_train if kind == "rm" else run_pm_train
    common = ("train.max_steps=3", "train.log_every=1", "train.micro_batch_size=4")
    a = run(judge_cfg(kind, tmp_path / "pairs", *common))
    b = run(judge_cfg(kind, tmp_path / "tokens", *common, "train.micro_batch_tokens=600"))
    assert json.loads((tmp_path / "tokens" / "train_plan.json").read_text())["micro_batch_tokens"] == 600
    assert _losses(tmp_path / "tokens") == pytest.approx(_losses(tmp_path / "pairs"), rel=1e-5)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-5)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
