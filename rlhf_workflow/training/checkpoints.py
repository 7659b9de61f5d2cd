"""The run folder of a training stage: what a re-run does with it, and its checkpoints.

A stage's ``output_dir`` holds ``config.yaml`` (the settings it started with), ``metrics.jsonl``,
``checkpoints/step-N/`` and, once finished, ``model/`` and ``train_result.json``.
:func:`start_run` decides at the start: resume (only under the same settings), start over
(``train.resume=restart``), continue under new ones (``force``), or nothing to do (finished).
A checkpoint is written by every rank into ``step-N.tmp`` and renamed into place once the
main process has marked it complete, so a crash never leaves one that looks complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ..config import Config, TrainConfig, save_config
from ..distributed import barrier
from ..errors import UserError
from ..faults import point
from ..io import remove_stale_temporaries, write_json
from ..manifest import write_manifest
from .engine import Engine, setup_for

# Settings that do not change what a run computes (memory, logging, checkpoint cadence):
# changing them between a crash and the re-run is fine.
RESUMABLE = ("train.progress", "train.log_every", "train.report_to", "train.save_every", "train.save_minutes",
             "train.keep_checkpoints", "train.resume", "train.timeout_minutes", "train.strategy",
             "train.micro_batch_size", "train.micro_batch_tokens", "train.grad_sync",
             "train.activation_checkpointing", "train.eval_every",
             "eval_batch_size", "train.save_file_gib", "data.token_cache", "train.peak_tflops")


def start_run(cfg: Config, train_cfg: TrainConfig) -> dict | None:
    """Prepare ``output_dir`` for a stage: refuse to resume a run that started with other
    settings (unless ``train.resume=force``), clear it with ``train.resume=restart``, save
    ``config.yaml``. Returns the result of an already finished run with the same settings."""
    out = Path(train_cfg.output_dir)
    rank, _, _ = setup_for(train_cfg)
    saved = out / "config.yaml"
    started = checkpoints(out) or (out / "train_result.json").exists()
    old = yaml.safe_load(saved.read_text()) if saved.exists() else None
    diff = _diff(old, cfg.model_dump(mode="json")) if started and old is not None else []
    barrier()  # every rank has read the old config before the main one writes the new one
    mode = train_cfg.resume
    if diff and mode == "auto":
        shown = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, a, b in diff[:10])
        more = f" and {len(diff) - 10} more" if len(diff) > 10 else ""
        raise UserError(f"{out} holds a run started with other settings: {shown}{more}; re-run with "
                        "train.resume=force to continue it with the new settings, or train.resume=restart "
                        "to start over")
    if mode != "restart" and not diff and (out / "train_result.json").exists() and (out / "model").exists():
        print(f"{out}: already trained with these settings; nothing to do (train.resume=restart retrains)")
        return json.loads((out / "train_result.json").read_text())
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        if mode == "restart":
            for name in ("checkpoints", "model", "adapter"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in ("metrics.jsonl", "train_result.json"):
                (out / name).unlink(missing_ok=True)
        save_config(cfg, saved)
        write_manifest(out, cfg)
    barrier()
    return None


def _diff(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """The settings that differ; a key only one side has (a run started by another version of
    the package, which had or lacked that setting) is not a difference."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(old.keys() & new.keys())
                for d in _diff(old.get(key), new.get(key), f"{prefix}{key}.")]
    key = prefix.rstrip(".")
    return [] if old == new or key in RESUMABLE else [(key, old, new)]


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


# --------------------------------------------------------------------------- checkpoints


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for p in (out / "checkpoints").glob("step-*"):
        step = p.name[5:]
        if step.isdigit() and (p / "state.json").exists():
            found.append((int(step), p))
    return sorted(found)


def save_checkpoint(eng: Engine, out: Path, step: int, keep: int) -> None:
    """Every rank writes its shard into ``step-N.tmp``; the main process then marks it
    complete (``state.json``), renames it into place and drops old checkpoints."""
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    barrier()
    if eng.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    eng.save_state(tmp)
    point("checkpoint")
    barrier()
    if eng.is_main:
        write_json(tmp / "state.json", {"step": step, "format": eng.checkpoint_format,
                                        "strategy": eng.strategy, "processes": eng.world})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    barrier()


def resume(eng: Engine, out: Path, scheduler) -> int:
    """Load the newest complete checkpoint (stale temporary ones are removed); its step."""
    if eng.is_main:
        for stale in (out / "checkpoints").glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    ckpts = checkpoints(out)
    if not ckpts:
        return 0
    step, path = ckpts[-1]
    state = json.loads((path / "state.json").read_text())
    saved_by = state.get("processes", eng.world)
    if state.get("format") == "deepspeed" and saved_by != eng.world:
        raise UserError(f"{path} was saved by DeepSpeed on {saved_by} processes; DeepSpeed resumes a run only on "
                        f"as many (this is {eng.world}): run it on {saved_by}, or use train.resume=restart "
                        "(FSDP's and one process's checkpoints load on any number)")
    eng.load_state(path, state.get("format", "dcp"))
    scheduler.last_epoch = step - 1  # the schedule is a function of the step: recompute it there
    scheduler.step()
    return step


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step, so a resumed run never duplicates a line."""
    if not path.exists():
        return
    lines = [x for x in path.read_text().split("\n") if x]  # JSON Lines: split on \n only
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
