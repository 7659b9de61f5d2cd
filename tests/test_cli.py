import json
import subprocess
import sys

import pytest

from rlhf_workflow.cli import COMMANDS, main


def test_top_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_command_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sft", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "optim.lr" in out and "[default: 2e-05]" in out and "train.global_batch_size" in out


def test_user_errors_exit_2_with_one_line(capsys):
    assert main(["sft", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'optim.lrr'") and "\n" not in err
    assert main(["frobnicate"]) == 2
    assert main(["sft", "model.path=/nonexistent/model"]) == 2
    assert "model path not found: /nonexistent/model" in capsys.readouterr().err


def test_bad_data_line_names_file_and_line(tmp_path, tiny_model, capsys):
    bad = tmp_path / "sft.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "yo"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    code = main(["sft", f"model.path={tiny_model}", f"data.train={bad}",
                 f"train.output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert f"error: {bad}, line 2: field 'messages.0.content'" in capsys.readouterr().err


def test_flag_style_options_and_console_script(tmp_path):
    out = tmp_path / "data"
    res = subprocess.run([sys.executable, "-m", "rlhf_workflow.cli", "sandbox", "make-data",
                          "--out", str(out), "--n-sft", "10", "n_prefs=5"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sum(1 for _ in (out / "sft.jsonl").open()) == 10
    assert sum(1 for _ in (out / "prefs_train.jsonl").open()) == 5


def test_config_goes_anywhere_among_the_overrides(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 1.0e-3\n")
    assert main(["sft", "optim.lrr=1", "--config", str(tmp_path / "c.yaml"), "train.max_steps=1"]) == 2
    assert "error: unknown config key 'optim.lrr'" in capsys.readouterr().err
