"""`rlhf loop report_to=[tensorboard,wandb]`: every iteration's numbers reach both trackers as one
run with iterations as steps, read back from TensorBoard's event file and W&B's offline run."""

import json

import pytest

from rlhf_workflow.online.loop import run_loop

pytest.importorskip("tensorboard", reason="the tracking extra (in dev)")
pytest.importorskip("wandb", reason="the tracking extra (in dev)")


def _tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / folder.name), size_guidance={"scalars": 0, "tensors": 0})  # the run's
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    texts = {tag: [e.step for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}
    return scalars, texts


def _wandb(folder):
    """The history rows of the offline run's ``.wandb`` log (LevelDB log framing: 32 KiB blocks of
    records with a 7-byte header, after a 7-byte file header; each record a protobuf)."""
    from wandb.proto import wandb_internal_pb2

    (run,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    data = run.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, part, history = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in record.history.item})
    return history


def test_the_loop_reports_each_iteration_to_tensorboard_and_wandb(loop_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    summary = run_loop(loop_cfg(out, "iterations=1", "annotate.annotator.kind=gold", "eval.kl=false",
                                "report_to=[tensorboard,wandb]"))
    rows = summary["iterations"]
    scalars, texts = _tensorboard(out)
    for key in ("gold_reward", "mean_tokens", "eos_rate", "gold_vs_baseline"):
        assert scalars[key] == pytest.approx({r["iteration"]: r[key] for r in rows if key in r}), key
    assert scalars["pairs"] == {1: rows[1]["pairs"]} and scalars["seconds.dpo"][1] == pytest.approx(rows[1]["seconds"]["dpo"])
    assert any(tag.startswith("pairs") for tag in texts)
    history = _wandb(tmp_path)
    logged = {h["_step"]: h for h in history if "gold_reward" in h}
    assert {t: h["gold_reward"] for t, h in logged.items()} == pytest.approx({r["iteration"]: r["gold_reward"] for r in rows})
    (table,) = [h for h in history if h.get("pairs/_type") == "table-file"]  # the sample pairs
    assert table["_step"] == 1 and table["pairs/nrows"] == min(8, rows[1]["pairs"])
