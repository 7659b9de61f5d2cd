"""Resumable, sharded processing of a record stream in chunks (generate and annotate).

Chunk i of the stream is handled by process ``i % world``; its output is written atomically
to ``<out>.parts/chunk-i.jsonl``. A chunk whose part exists is skipped, so a crash loses at
most one chunk per process. The main process joins the parts in order into ``out``.

The parts folder carries the fingerprint of the settings that made it (``settings.json``):
parts made under other settings are never reused, and a folder left behind by a crash after
the join is removed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm

from ..distributed import barrier
from ..faults import point
from ..io import atomic_open, write_json, write_jsonl


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


def start_parts(out: Path, settings: dict, rank: int) -> bool:
    """Prepare ``out``'s parts folder for these ``settings``; False when ``out`` is done already
    (a leftover parts folder is removed). Every rank calls it."""
    parts = parts_dir(out)
    if rank == 0:
        if out.exists():
            shutil.rmtree(parts, ignore_errors=True)
        elif parts.exists() and _settings(parts) != settings:
            shutil.rmtree(parts)  # made by other settings (or unfinished): start the stage over
        if not out.exists() and not parts.exists():
            parts.mkdir(parents=True)
            write_json(parts / "settings.json", settings)
    barrier()
    return not out.exists()


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
    shutil.rmtree(parts)
