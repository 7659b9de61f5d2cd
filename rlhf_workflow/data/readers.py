"""Read records from JSON Lines, parquet, or a Hugging Face hub dataset, validating each one.

A bad line is a :class:`UserError` naming the file, the line and the field; nothing is
silently skipped. Files are streamed, so a pool of a million prompts is never held twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from ..errors import UserError
from .records import Record

R = TypeVar("R", bound=Record)


def iter_rows(source: str | Path, split: str = "train") -> Iterator[tuple[str, object]]:
    """(location such as ``"data.jsonl, line 7"``, raw row) for every row of a .jsonl/.json
    file, a .parquet file or a hub dataset, streamed."""
    path = Path(source)
    if path.exists() or path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise UserError(f"data file not found: {path}")
        parquet = path.suffix == ".parquet"
        rows, where = (_parquet_rows(path), f"{path}, row") if parquet else (_jsonl_rows(path), f"{path}, line")
    elif _looks_like_hub_name(str(source)):
        rows, where = _hub_rows(str(source), split), f"{source}[{split}], row"
    else:
        raise UserError(f"data file not found: {path} (and it is not a hub dataset name)")
    for n, row in rows:
        yield f"{where} {n}", row


def iter_records(source: str | Path, kind: type[R], split: str = "train") -> Iterator[R]:
    """Yield validated ``kind`` records; a bad row is a UserError naming file, line and field."""
    for at, row in iter_rows(source, split):
        if not isinstance(row, dict):
            raise UserError(f"{at}: expected a JSON object, got {type(row).__name__}")
        try:
            yield kind.model_validate(row)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(record)"
            raise UserError(f"{at}: field {field!r}: {err['msg']}") from None


def read_records(source: str | Path, kind: type[R], split: str = "train") -> list[R]:
    records = list(iter_records(source, kind, split))
    if not records:
        raise UserError(f"{source}: no records")
    return records


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({e.msg})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _hub_rows(name: str, split: str) -> Iterator[tuple[int, object]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # network, missing dataset, missing split: all user-facing
        raise UserError(f"could not load hub dataset {name!r} split {split!r}: {e}") from None
    yield from enumerate(ds, start=1)


def _looks_like_hub_name(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/"))
