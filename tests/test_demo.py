"""`rlhf demo` end to end on a reduced configuration, and continuing a finished stage."""

import json

from rlhf_workflow.cli import main

SMALL = ["data.n_sft=400", "data.n_prefs=100", "data.n_prefs_test=50", "data.n_train_prompts=50",
         "data.n_eval_prompts=20", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
         "model.intermediate_size=128", "sft.train.epochs=1", "sft.train.progress=false"]


def test_demo_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", f"out={out}", *SMALL]) == 0
    result = json.loads((out / "eval" / "sft.json").read_text())
    assert result["n"] == 80 and 0 <= result["eos_rate"] <= 1
    assert (out / "sft" / "model" / "model.safetensors").exists() and (out / "config.yaml").exists()
    capsys.readouterr()
    assert main(["demo", f"out={out}", *SMALL]) == 0
    log = capsys.readouterr().out
    assert log.count("done already") == 4  # nothing is recomputed
