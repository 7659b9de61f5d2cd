"""The shared loop's bookkeeping through the SFT stage: what a re-run does with an existing
output folder, checkpoints by time, the logged learning rate, the printed plan, and
activation checkpointing."""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf_workflow.config import load_config
from rlhf_workflow.errors import UserError
from rlhf_workflow.training.sft import SFTConfig, run_sft


def _cfg(tiny_model, sandbox_data, out, *overrides):
    return load_config(SFTConfig, None, [
        f"model.path={tiny_model}", f"data.train={sandbox_data / 'sft.jsonl'}", "data.max_length=128",
        "data.packing=false", "optim.lr=1e-3", "optim.warmup_ratio=0", f"train.output_dir={out}",
        "train.progress=false", "train.log_every=1", "train.global_batch_size=4", *overrides])


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _crash_at(n):
    def crash(step, record):
        if step == n:
            raise KeyboardInterrupt
    return crash


def test_resume_under_changed_settings_is_refused_then_forced_or_restarted(tiny_model, sandbox_data,
                                                                            tmp_path, capsys):
    common = ["train.max_steps=4", "train.save_every=2"]
    with pytest.raises(KeyboardInterrupt):
        run_sft(_cfg(tiny_model, sandbox_data, tmp_path, *common), on_step=_crash_at(3))
    changed = [*common, "optim.lr=2e-3", "train.max_steps=5", "train.log_every=2"]
    with pytest.raises(UserError) as e:
        run_sft(_cfg(tiny_model, sandbox_data, tmp_path, *changed))
    msg = str(e.value)
    assert "optim.lr (0.001 -> 0.002)" in msg and "train.max_steps (4 -> 5)" in msg
    assert "log_every" not in msg  # logging settings may change between runs
    assert "train.resume=force" in msg and "train.resume=restart" in msg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 1e-3  # untouched

    capsys.readouterr()
    run_sft(_cfg(tiny_model, sandbox_data, tmp_path, *changed, "train.resume=force"))
    assert "resuming at step 2" in capsys.readouterr().out
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 4, 5]  # log_every=2 from step 3 on
    assert [r["lr"] for r in _records(tmp_path)][-1] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 2e-3

    run_sft(_cfg(tiny_model, sandbox_data, tmp_path, *common, "train.resume=restart"))
    assert "starting fresh" in capsys.readouterr().out
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4]


def test_a_run_started_by_another_version_resumes_despite_added_or_removed_settings(tiny_model, sandbox_data,
                                                                                       tmp_path, capsys):
    """A setting the run's version did not have (added since), or had (removed since), is not a
    changed setting: the run resumes under auto."""
    common = ["train.max_steps=4", "train.save_every=2"]
    with pytest.raises(KeyboardInterrupt):
        run_sft(_cfg(tiny_model, sandbox_data, tmp_path, *common), on_step=_crash_at(3))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["train"]["save_file_gib"]
    saved["train"]["an_old_setting"] = 7
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    run_sft(_cfg(tiny_model, sandbox_data, tmp_path, *common))
    assert "resuming at step 2" in capsys.readouterr().out


def test_a_finished_run_is_not_trained_again(tiny_model, sandbox_data, tmp_path, capsys):
    cfg = _cfg(tiny_model, sandbox_data, tmp_path, "train.max_steps=2")
    run_sft(cfg)
    before = load_file(tmp_path / "model" / "model.safetensors")
    mtime = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    run_sft(cfg)
    assert "already trained with these settings" in capsys.readouterr().out
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="optim.lr"):
        run_sft(_cfg(tiny_model, sandbox_data, tmp_path, "train.max_steps=2", "optim.lr=5e-4"))
    assert load_file(tmp_path / "model" / "model.safetensors").keys() == before.keys()


def test_checkpoints_by_wall_clock_by_default(tiny_model, sandbox_data, tmp_path, capsys):
    """No ``save_every``: a checkpoint is written whenever ``save_minutes`` have passed (here:
    after every step), so a crash loses at most that much work; the re-run says where it resumes."""
    cfg = _cfg(tiny_model, sandbox_data, tmp_path, "train.max_steps=5", "train.save_minutes=1e-9")
    assert cfg.train.save_every == 0
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, on_step=_crash_at(4))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    capsys.readouterr()
    run_sft(cfg)
    assert "resuming at step 4" in capsys.readouterr().out


def test_logged_lr_is_the_rate_the_step_used_and_the_plan_is_printed(tiny_model, sandbox_data,
                                                                      tmp_path, capsys):
    run_sft(_cfg(tiny_model, sandbox_data, tmp_path, "train.epochs=0.05", "optim.warmup_ratio=0.4"))
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "train_plan.json").read_text())
    total, warmup = plan["optimizer_steps"], plan["warmup_steps"]
    assert (total, warmup, plan["grad_accum"], plan["processes"]) == (8, 4, 1, 1)  # 600 x 0.05 / 4
    assert "global batch 4 = 4 x 1 accumulation x 1; 8 optimizer steps, 4 warmup; starting fresh" in out
    assert "warning: only 8 optimizer step(s)" in out
    lrs = [r["lr"] for r in _records(tmp_path)]
    expected = [1e-3 * k / warmup if k < warmup else
                1e-3 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) for k in range(total)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == 0.0 and lrs[-1] > 0  # the first step warms up from 0; the last still trains


def test_activation_checkpointing_gives_the_same_training(tiny_model, sandbox_data, tmp_path, monkeypatch):
    a = run_sft(_cfg(tiny_model, sandbox_data, tmp_path / "a", "train.max_steps=2"))
    import transformers.modeling_utils as hf

    calls = []
    real = hf.checkpoint
    monkeypatch.setattr(hf, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    b = run_sft(_cfg(tiny_model, sandbox_data, tmp_path / "b", "train.max_steps=2",
                     "train.activation_checkpointing=true"))
    assert len(calls) >= 2 * 2  # every decoder layer of every forward was recomputed
    assert [r["loss"] for r in _records(tmp_path / "a")] == pytest.approx([r["loss"] for r in _records(tmp_path / "b")])
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def _nan_at(step_to_fail, monkeypatch):
    """Make the SFT loss nan on one optimizer step (its micro-batches)."""
    from rlhf_workflow.training import sft as sft_module

    real, calls = sft_module.sft_objective, []

    def objective(model, batch):
        calls.append(1)
        out = real(model, batch)
        if len(calls) == step_to_fail:  # one micro-batch per step here
            out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(sft_module, "sft_objective", objective)


def test_a_nan_loss_stops_the_run_and_keeps_the_checkpoints(tiny_model, sandbox_data, tmp_path, monkeypatch):
    _nan_at(3, monkeypatch)
    cfg = _cfg(tiny_model, sandbox_data, tmp_path, "train.max_steps=5", "train.save_every=2",
               "train.micro_batch_size=4")
    with pytest.raises(UserError, match=r"step 3: loss nan, gradient norm nan: the weights were not updated "
                                         r"and training stopped \(last checkpoint: step-000002, from before it\)"):
        run_sft(cfg)
    assert not (tmp_path / "model").exists() and (tmp_path / "checkpoints" / "step-000002").exists()


def test_a_nan_step_is_skipped_on_request(tiny_model, sandbox_data, tmp_path, monkeypatch, capsys):
    _nan_at(3, monkeypatch)
    run_sft(_cfg(tiny_model, sandbox_data, tmp_path, "train.max_steps=5", "train.micro_batch_size=4",
                 "train.on_nonfinite=skip"))
    records = _records(tmp_path)
    assert [r.get("skipped_steps", 0) for r in records] == [0, 0, 1, 1, 1]
    assert math.isnan(records[2]["loss"]) and math.isfinite(records[3]["loss"])
    assert "step 3: loss nan, gradient norm nan: step skipped" in capsys.readouterr().err
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "model" / "model.safetensors").values())


def test_sigterm_stops_at_a_step_with_a_checkpoint_and_the_rerun_resumes(tiny_model, sandbox_data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "rlhf_workflow.cli", "sft", f"model.path={tiny_model}",
            f"data.train={sandbox_data / 'sft.jsonl'}", "data.max_length=128", "data.packing=false",
            "train.max_steps=60", "train.global_batch_size=4", "train.log_every=1", "train.progress=false",
            f"train.output_dir={tmp_path}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # as a cluster scheduler does on pre-emption
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    stopped = int(err.split("stopped at step ")[1].split()[0])
    assert "checkpoint saved); run the same command again to resume" in err
    assert 1 <= stopped < 60 and (tmp_path / "checkpoints" / f"step-{stopped:06d}" / "state.json").exists()
    assert not (tmp_path / "model").exists()
    done = subprocess.run(args,
                          capture_output=True, text=True, timeout=600)
    assert f"resuming at step {stopped}" in done.stdout
    assert [r["step"] for r in _records(tmp_path)] == list(range(1, 61))
