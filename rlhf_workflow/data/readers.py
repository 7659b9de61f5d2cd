"""Read records from JSON Lines, parquet, or a Hugging Face hub dataset, validating each one.

A bad line is a :class:`UserError` naming the file, the line and the field, or where the
stage allows it (``on_bad=skip``) a skip counted by reason and reported; nothing is dropped
silently. The rules live on the record types (:mod:`.records`), so every stage applies the same
ones with the same message. Files are streamed, so a pool of a million prompts is never held
twice; a UTF-8 byte-order mark is tolerated, and a gzip-compressed JSONL file read as it is.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from ..errors import UserError
from .records import PreferencePair, Record

R = TypeVar("R", bound=Record)


def iter_rows(source: str | Path, split: str = "train",
              skipped: Counter | None = None) -> Iterator[tuple[str, object]]:
    """(location such as ``"data.jsonl, line 7"``, raw row) for every row of a .jsonl/.json
    file (or one compressed with gzip), a .parquet file or a hub dataset, streamed. A line that is not JSON is an error, or
    counted in ``skipped`` when one is given."""
    path = Path(source)
    if path.exists() or path.suffix in (".jsonl", ".json", ".parquet", ".gz"):
        if not path.is_file():
            raise UserError(f"data file not found: {path}")
        parquet = path.suffix == ".parquet"
        rows, where = (_parquet_rows(path), f"{path}, row") if parquet else (_jsonl_rows(path, skipped), f"{path}, line")
    elif _looks_like_hub_name(str(source)):
        rows, where = _hub_rows(str(source), split), f"{source}[{split}], row"
    else:
        raise UserError(f"data file not found: {path} (and it is not a hub dataset name)")
    for n, row in rows:
        yield f"{where} {n}", row


def iter_records(source: str | Path, kind: type[R], split: str = "train",
                 skipped: Counter | None = None) -> Iterator[R]:
    """Yield validated ``kind`` records. A bad row is a UserError naming the file, the line and
    the field, or, when a ``skipped`` counter is given, skipped and counted by reason."""
    for _, record, _ in validated_rows(source, kind, split, skipped):
        yield record


def validated_rows(source: str | Path, kind: type[R], split: str = "train",
                   skipped: Counter | None = None) -> Iterator[tuple[str, R, dict]]:
    """(location, validated record, raw row) for every valid row (see :func:`iter_records`)."""
    for at, row in iter_rows(source, split, skipped):
        if not isinstance(row, dict):
            problem = f"expected a JSON object, got {type(row).__name__}"
        else:
            try:
                yield at, kind.model_validate(row), row
                continue
            except ValidationError as e:
                problem = describe(e)
        if skipped is None:
            raise UserError(f"{at}: {problem}")
        skipped[problem.split(":")[0] + ": " + problem.split(": ")[-1]] += 1


def describe(err: ValidationError) -> str:
    """``field 'chosen': must end with ...`` for a record's first error; of the branches of a
    union (a string or messages), the one that got furthest (``prompt.0.content``)."""
    e = max(err.errors(), key=lambda e: len(e["loc"]))
    msg = e["msg"].removeprefix("Value error, ")
    field = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("str", "list["))) or ""
    if not field and ": " in msg:  # a record-level rule names its field first
        field, msg = msg.split(": ", 1)
    return f"field {field or '(record)'!r}: {msg}"


def read_records(source: str | Path, kind: type[R], split: str = "train",
                 on_bad: str = "error") -> list[R]:
    """All valid records; bad ones fail (``on_bad="error"``) or are skipped with a printed count."""
    skipped = Counter() if on_bad == "skip" else None
    records = list(iter_records(source, kind, split, skipped))
    if skipped:
        print(f"{source}: skipped {fmt_counts(skipped)}")
    if not records:
        raise UserError(f"{source}: no records" + (f" ({fmt_counts(skipped)} skipped)" if skipped else ""))
    return records


def fmt_counts(c: Counter) -> str:
    return ", ".join(f"{n} x {why}" for why, n in c.most_common())


@dataclass(frozen=True)
class PairRow:
    where: str  # "file, line n" for messages
    pair: PreferencePair
    margin: float = 0.0


def read_pairs(source: str, split: str = "train", on_bad: str = "error",
               margin_field: str | None = None) -> tuple[list[PairRow], Counter]:
    """Validated preference pairs (with their location and, from ``margin_field``, a margin) and
    the count of skipped pairs per reason."""
    skipped: Counter = Counter()
    out = []
    for at, pair, row in validated_rows(source, PreferencePair, split, skipped if on_bad == "skip" else None):
        margin = 0.0
        if margin_field is not None:
            value = row.get(margin_field, (row.get("meta") or {}).get(margin_field))
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problem = f"field {margin_field!r}: the margin must be a number, got {value!r}"
                if on_bad != "skip":
                    raise UserError(f"{at}: {problem}")
                skipped[problem] += 1
                continue
            margin = float(value)
        out.append(PairRow(at, pair, margin))
    if not out:
        raise UserError(f"{source}: no valid preference pairs" + (f" ({fmt_counts(skipped)} skipped)" if skipped else ""))
    return out, skipped


def split_held_out(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded random ``fraction`` of ``rows`` held out (at least one)."""
    if fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(f"{seed}/held-out").shuffle(order)
    k = max(1, round(fraction * len(rows)))
    held = set(order[:k])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _jsonl_rows(path: Path, skipped: Counter | None = None) -> Iterator[tuple[int, object]]:
    """Lines of a JSONL file, plain or gzip-compressed (told by its first bytes, whatever its
    name), each decoded as UTF-8: a line that is not is one error naming its first bad byte."""
    with path.open("rb") as raw:
        packed = raw.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path) if packed else path.open("rb") as f:
            for n, data in enumerate(f, start=1):
                try:
                    line = data.decode("utf-8-sig" if n == 1 else "utf-8")
                    if not line.strip():
                        continue
                    row = json.loads(line)
                except UnicodeDecodeError as e:
                    problem = (f"not UTF-8 text (byte 0x{data[e.start]:02x} at byte {e.start + 1} of the line; "
                               "save the file as UTF-8)", "not UTF-8 text")
                except json.JSONDecodeError as e:
                    problem = (f"not valid JSON ({e.msg})", "not valid JSON")
                else:
                    yield n, row
                    continue
                if skipped is None:
                    raise UserError(f"{path}, line {n}: {problem[0]}")
                skipped[problem[1]] += 1
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UserError(f"{path}: a damaged gzip file ({e or 'it ends too soon'})") from None


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
