"""Resumable, sharded processing of a record stream in chunks (generate and annotate).

Chunk i of the stream is handled by process ``i % world``; its output is written atomically
to ``<out>.parts/chunk-i.jsonl``. A chunk whose part exists is skipped, so a crash loses at
most one chunk per process. The main process joins the parts in order into ``out``.

The parts folder carries the fingerprint of the settings that made it (``settings.json``):
parts made under other settings are never reused, and a folder left behind by a crash after
the join is removed. The fingerprint moves beside the joined output (``<out>.settings.json``),
so a re-run onto a finished output with other settings is refused instead of keeping the old
file; settings that do not change what is computed (how bad records are handled once all are
valid, where engines run) are left out of it by the stage, so changing them keeps finished work.

One process at a time works on an output: the main process holds an exclusive lock
(``flock``) on ``.<out>.lock`` while the stage runs, and a second run is refused with one line
instead of racing in the chunk folders. On a network filesystem the lock holds across nodes
where the filesystem supports locks (NFSv4; Lustre mounted with ``flock``); where it does not,
a warning says so and the stage runs unlocked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm

from ..config import flatten
from ..distributed import gather_objects
from ..errors import UserError
from ..faults import point
from ..io import atomic_open, read_json, write_json, write_jsonl


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def chunks(records: Iterator, size: int) -> Iterator[list]:
    while batch := list(islice(records, size)):
        yield batch


def count_records(source: str | Path) -> int | None:
    """Records in a local .jsonl (non-blank lines) or .parquet file (its metadata), for a
    progress bar's total; None for anything else (a hub dataset is not read twice)."""
    path = Path(source)
    if not path.is_file():
        return None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


@contextmanager
def locked(out: Path, rank: int = 0):
    """Hold an exclusive lock on ``out`` (a file or folder: the lock is ``.<name>.lock`` beside
    it) on the main process for the block; another process holding it is a one-line error on
    every rank."""
    fd, problem = None, None
    if rank == 0:
        fd, problem = _lock(out.with_name(f".{out.name}.lock"), str(out))
    problem = gather_objects(problem)[0]
    if problem:
        raise UserError(problem)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # (releases the lock)


def _lock(path: Path, what: str) -> tuple[int | None, str | None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, (f"{what} is in use by {holder}: one run at a time; wait for it to end, "
                      "or choose another out=")
    except OSError as e:  # a filesystem without locks
        print(f"warning: cannot lock {path} ({e.strerror}): make sure no other run uses {what}")
        return fd, None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
    return fd, None


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def start_parts(out: Path, settings: dict, rank: int) -> bool:
    """Prepare ``out``'s parts folder for these ``settings``; False when ``out`` is done already
    (a leftover parts folder is removed). An ``out`` that is a folder, or that was made with
    other settings, is an error. Every rank calls it."""
    problem = gather_objects(_prepare(out, settings) if rank == 0 else None)[0]
    if problem:
        raise UserError(problem)
    return not out.exists()


def _prepare(out: Path, settings: dict) -> str | None:
    """What is wrong with ``out`` (None: nothing), else its parts folder made ready."""
    problem = _not_ours(out, settings)
    if problem is not None:
        return problem
    parts = parts_dir(out)
    if out.exists():
        shutil.rmtree(parts, ignore_errors=True)
        return None
    if parts.exists() and _settings(parts) != settings:
        shutil.rmtree(parts)  # made by other settings (or unfinished): start the stage over
    if not parts.exists():
        parts.mkdir(parents=True)
        write_json(parts / "settings.json", settings)
    return None


def _not_ours(out: Path, settings: dict) -> str | None:
    """Why ``out`` cannot be this stage's output: a folder, or made with other settings."""
    if out.is_dir():
        return f"out={out} is a folder: give the path of the file to write"
    if not out.exists() or not settings_path(out).exists():
        return None  # (an output of an earlier version, without its settings: kept)
    old, new = flatten(read_json(settings_path(out))), flatten(settings)
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if not diff:
        return None
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
    return (f"{out} exists, made with other settings ({shown}{' ...' if len(diff) > 5 else ''}); "
            f"remove it (and {settings_path(out).name}) to make it again, or choose another out=")


def _settings(parts: Path) -> dict | None:
    try:
        return json.loads((parts / "settings.json").read_text())
    except (OSError, ValueError):
        return None


def process_chunks(records: Iterator, out: Path, chunk_size: int, rank: int, world: int,
                   fn: Callable[[int, list], list[dict]], desc: str, total: int | None = None,
                   write: bool = True) -> int:
    """Run ``fn(chunk_index, records)`` on this process's unfinished chunks; return the count.
    ``total`` (the number of records, when known) gives the progress bar its end. Without
    ``write`` the results are not written (ranks that compute a chunk together with the one that
    writes it)."""
    parts = parts_dir(out)
    n_chunks = 0
    with tqdm(total=total, desc=desc, unit="prompt", disable=rank != 0, dynamic_ncols=True) as bar:
        for i, batch in enumerate(chunks(records, chunk_size)):
            n_chunks = i + 1
            part = parts / f"chunk-{i:06d}.jsonl"
            if i % world == rank and not part.exists():
                results = fn(i, batch)
                point(f"{desc}.chunk")
                if write:
                    write_jsonl(part, results)
            bar.update(len(batch))
    return n_chunks


def join_parts(out: Path, n_chunks: int) -> None:
    parts = parts_dir(out)
    missing = [i for i in range(n_chunks) if not (parts / f"chunk-{i:06d}.jsonl").exists()]
    if missing:
        raise RuntimeError(f"chunks {missing[:5]} are missing from {parts}")
    with atomic_open(out) as f:
        for i in range(n_chunks):
            with (parts / f"chunk-{i:06d}.jsonl").open() as src:
                shutil.copyfileobj(src, f)
            point("join")
    os.replace(parts / "settings.json", settings_path(out))
    shutil.rmtree(parts)
