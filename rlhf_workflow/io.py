"""Atomic file writes and JSON Lines helpers.

Every artifact another stage depends on is written to a temporary file in the same folder
and renamed into place, so a crash never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w"):
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` on success.

    A full disk or a folder that cannot be written is one line naming the file; what was
    there before stays intact. The file gets the permissions ``open()`` would give it."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it 0600; `open()` would honour the umask
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:
            raise UserError(f"cannot write {path}: {e.strerror} (earlier files are intact)") from None
        raise


@functools.cache
def umask() -> int:
    """The process's umask (read once: reading it means setting it, for every thread)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_dir(tmp: str | Path, out: str | Path) -> None:
    """Move the finished folder ``tmp`` to ``out`` (a sibling): a folder cannot be renamed onto a
    non-empty one, so an existing ``out`` is moved aside first and removed after. The folder and
    its files get the permissions ``mkdir`` and ``open()`` would give them (``mkdtemp`` and some
    writers, safetensors among them, make them private to the user)."""
    tmp, out = Path(tmp), Path(out)
    for p in [tmp, *tmp.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask())
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def remove_stale_temporaries(folder: str | Path) -> int:
    """Remove the temporary files and folders (``.NAME.*.tmp``, ``.NAME.tmp``, ``.NAME.old``) a
    killed process left under ``folder``; returns how many. Only for folders a run owns alone."""
    stale = [*Path(folder).rglob(".*.tmp"), *Path(folder).rglob(".*.old")]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(stale)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write one JSON object per line (dataclasses and pydantic models are converted)."""
    n = 0
    with atomic_open(path) as f:
        for rec in records:
            f.write(json.dumps(to_jsonable(rec), ensure_ascii=False) + "\n")
            n += 1
    return n


def to_jsonable(rec: Any) -> Any:
    if hasattr(rec, "model_dump"):
        return rec.model_dump(exclude_none=True)
    if hasattr(rec, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(rec)
    return rec
