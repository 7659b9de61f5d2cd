"""Resumable, sharded processing of a record stream in chunks (generate and annotate).

Chunk i of the stream is handled by process ``i % world``; its output is written atomically
to ``<out>.parts/chunk-i.jsonl``. A chunk whose part exists is skipped, so a crash loses at
most one chunk per process. The main process joins the parts in order into ``out``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm

from ..io import atomic_open, write_jsonl


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


def process_chunks(records: Iterator, out: Path, chunk_size: int, rank: int, world: int,
                   fn: Callable[[int, list], list[dict]], desc: str, total: int | None = None) -> int:
    """Run ``fn(chunk_index, records)`` on this process's unfinished chunks; return the count.
    ``total`` (the number of records, when known) gives the progress bar its end."""
    parts = parts_dir(out)
    parts.mkdir(parents=True, exist_ok=True)
    n_chunks = 0
    bar = tqdm(total=total, desc=desc, unit="prompt", disable=rank != 0, dynamic_ncols=True)
    for i, batch in enumerate(chunks(records, chunk_size)):
        n_chunks = i + 1
        part = parts / f"chunk-{i:06d}.jsonl"
        if i % world == rank and not part.exists():
            write_jsonl(part, fn(i, batch))
        bar.update(len(batch))
    bar.close()
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
    shutil.rmtree(parts)
