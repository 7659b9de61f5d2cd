"""Tokenize once: a stage's tokenized examples cached on disk, built by all ranks, read lazily.

A stage's examples (SFT conversations, preference pairs, PM comparisons) are tokenized once
into a folder ``<root>/<stage>-<key>``, where the key hashes everything the tokens depend on:
the data (a local file's sha256; a hub dataset's name, split and revision), the tokenizer
(its whole serialisation, chat template, special and added tokens, the library versions),
the stage's settings (lengths, truncation and skipping rules, seeds, which records) and
:data:`FORMAT_VERSION`. A later run or a resume with the same key reads the folder instead
of tokenizing; any change gives another key. The root is ``$RLHF_TOKEN_CACHE``, else
``~/.cache/rlhf-workflow/tokens``; deleting it is always safe.

Layout, numpy files read memory-mapped (the ranks of a node share one copy in the page cache
instead of each holding Python lists): ``ids.npy`` every token id (int32, flat), ``mask.npy``
the loss masks aligned with them (bool), ``offsets.npy`` (int64) where each sequence starts,
``k`` sequences per example (a pair has 2, chosen first), one ``<field>.npy`` (int64) per
per-example number a stage needs (a pair's ``truncated`` flag, a PM label, the record it came
from), and ``meta.json`` with the key's inputs and the count of skipped records. A folder is
built under a temporary name and renamed once complete: a crash never leaves one that looks done.

On several ranks, rank ``r`` tokenizes the ``r``-th contiguous block of the records and
writes it as a part; after a barrier the main process joins the parts in order (the files are
byte for byte those one process writes) and publishes the folder; after a second barrier
every rank reads it. The cache root must then be a folder every rank sees, like the output
folder. :class:`TokenCache` gives the stage its examples one at a time, as the same objects
tokenizing directly gives (a :class:`.pairs.TokenizedPair`, a :class:`.chat.Tokenized`).
"""

from __future__ import annotations

import hashlib
import io
import json
import operator
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..distributed import barrier, rank_and_world
from ..errors import UserError
from ..io import read_json, write_json, write_text
from .chat import TemplateRefused, Tokenized
from .pairs import TokenizedPair

FORMAT_VERSION = 2  # bump when a stage's tokenization changes: old caches are then not read
PAIR_FIELDS = ("truncated", "prefix")  # what :meth:`TokenCache.pair` reads, see :func:`pair_example`
HEADER = 128  # bytes of a 1-D .npy header: written first as a placeholder, patched at the end
WAIT_S = 30.0  # how long a rank waits for files another rank wrote to appear (network filesystems)

# encode(i, record) -> (the example's sequences, its fields), or None to skip it (counted)
Example = tuple[Sequence[Tokenized | list[int]], dict[str, int]]
Encode = Callable[[int, Any], Example | None]
Locate = Callable[[int], str]  # record i -> "data.jsonl, line 7", for an error naming it


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_TOKEN_CACHE") or "~/.cache/rlhf-workflow/tokens").expanduser()


# --------------------------------------------------------------------------- the key


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def data_identity(source: str, split: str) -> dict:
    """A local file by its bytes (a copy elsewhere is the same data); a hub dataset by its
    name, split and revision (when the hub answers), else by name and split."""
    path = Path(source).expanduser()
    if path.is_file():
        return {"sha256": file_sha256(path), "suffix": path.suffix}
    return {"name": str(source), "split": split, "revision": _hub_revision(str(source))}


def _hub_revision(name: str) -> str | None:
    if (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or name.count("/") != 1
            or Path(name).suffix in (".jsonl", ".json", ".parquet")):  # a missing local file
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, timeout=10).sha
    except Exception:  # offline, unknown or private: the reader reports what matters
        return None


def tokenizer_identity(tokenizer) -> dict:
    """What a tokenizer's output depends on: its full serialisation (vocabulary, merges,
    normaliser, added tokens, post-processor), chat template and special tokens."""
    import tokenizers
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {
        "class": type(tokenizer).__name__,
        "serialized": hashlib.sha256(text.encode()).hexdigest(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": getattr(tokenizer, "special_tokens_map", None),
        "added_tokens": [[i, t.content, t.special, t.lstrip, t.rstrip, t.normalized, t.single_word]
                         for i, t in sorted(added.items())],
        "size": len(tokenizer),
        "clean_up_tokenization_spaces": getattr(tokenizer, "clean_up_tokenization_spaces", None),
        "versions": [transformers.__version__, tokenizers.__version__],
    }


def cache_key(data: dict, tokenizer, settings: dict) -> str:
    blob = {"format": FORMAT_VERSION, "data": data, "tokenizer": tokenizer_identity(tokenizer),
            "settings": settings}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- reading


class Lazy(Sequence):
    """A read-only sequence of ``n`` items, item ``i`` made by ``get(i)`` when accessed."""

    def __init__(self, n: int, get: Callable[[int], Any]):
        self._n, self._get = n, get

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(k) for k in range(*i.indices(self._n))]
        i = operator.index(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} items")
        return self._get(i)


class TokenCache:
    """A complete cache folder, memory-mapped; ``origin`` says how it came about (printed
    after "N examples tokenized")."""

    def __init__(self, path: str | Path, origin: str = ""):
        self.path, self.origin = Path(path), origin
        self.meta = read_json(self.path / "meta.json")
        load = lambda name: np.load(self.path / f"{name}.npy", mmap_mode="r")  # noqa: E731
        self.ids, self.offsets = load("ids"), load("offsets")
        self.mask = load("mask") if self.meta["masks"] else None
        self.fields = {name: load(name) for name in self.meta["fields"]}
        self.k = self.meta["sequences_per_example"]

    def __len__(self) -> int:
        return self.meta["examples"]

    @property
    def skipped(self) -> int:
        """Records the stage's ``encode`` skipped (too long, nothing to train on)."""
        return self.meta["skipped"]

    @property
    def refused(self) -> int:
        """Records skipped because the chat template refused them (``on_bad=skip``)."""
        return self.meta.get("refused", 0)

    def input_ids(self, i: int, j: int = 0) -> list[int]:
        """Token ids of sequence ``j`` of example ``i``."""
        a, b = self._span(i, j)
        return self.ids[a:b].tolist()

    def tokenized(self, i: int, j: int = 0) -> Tokenized:
        a, b = self._span(i, j)
        return Tokenized(self.ids[a:b].tolist(), self.mask[a:b].tolist())

    def pair(self, i: int) -> TokenizedPair:
        return TokenizedPair(self.tokenized(i, 0), self.tokenized(i, 1), bool(self.fields["truncated"][i]))

    def pairs(self) -> Lazy:
        """The examples as :class:`TokenizedPair` s (built by :func:`pair_example`)."""
        return Lazy(len(self), self.pair)

    def digest(self) -> str:
        """A hash of every token id, loss mask and sequence boundary, read from the files in
        place (what depends on the exact tokens, e.g. the DPO reference cache, keys on it)."""
        h = hashlib.sha256()
        for a in (self.ids, self.mask, self.offsets):
            if a is not None:
                h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
        return h.hexdigest()

    def field(self, name: str) -> np.ndarray:
        return self.fields[name]

    def lengths(self) -> np.ndarray:
        """(examples, k) token counts of each example's sequences."""
        return np.diff(self.offsets).reshape(len(self), self.k)

    def _span(self, i: int, j: int) -> tuple[int, int]:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        s = (i % len(self)) * self.k + j
        return int(self.offsets[s]), int(self.offsets[s + 1])


def pair_example(tok: TokenizedPair, **fields: int) -> Example:
    """A pair as an :data:`Example` that :meth:`TokenCache.pair` reads back (its
    ``shared_prefix`` stored too, so lengths need no pass over the tokens)."""
    return (tok.chosen, tok.rejected), {"truncated": tok.truncated, "prefix": tok.shared_prefix, **fields}


# --------------------------------------------------------------------------- building


def tokenize_cached(name: str, source: tuple[str, str], settings: dict, tokenizer,
                    records: Sequence | Callable[[], Sequence], encode: Encode, fields: Sequence[str] = (),
                    masks: bool = True, enabled: bool = True, progress: bool = True,
                    noun: str = "examples", on_bad: str = "error", locate: Locate | None = None) -> TokenCache:
    """The tokenized ``records`` of a stage ``name``: read from the cache, or made by
    ``encode(i, record)`` (on all ranks, each its block) and cached; ``records`` may be a
    callable, then called only on a miss. ``source`` is the data's (path or hub name, split);
    ``settings`` every stage setting the tokens depend on (``on_bad`` among them). A record
    the chat template refuses is an error naming it (``locate(i)``), or with
    ``on_bad="skip"`` skipped and counted. ``enabled=False`` tokenizes everything on every
    rank into a private temporary folder, removed once mapped. Prints one line on the main
    process: ``NAME: N NOUN tokenized, read from PATH`` (or how made)."""
    rank, world = rank_and_world()
    start = time.perf_counter()
    known = None if callable(records) else len(records)
    encode = _refusals(encode, on_bad, locate or (lambda i: f"{source[0]}, record {i + 1}"))
    if not enabled:
        with tempfile.TemporaryDirectory(prefix="rlhf-tokens-") as tmp:
            out = Path(tmp) / "cache"
            items = records() if callable(records) else records
            _write_part(out, items, 0, len(items), encode, fields, masks, progress and rank == 0, name)
            _finish([out], out, {"stage": name, "records": len(items)}, fields, masks)
            cache = TokenCache(out, f" in {time.perf_counter() - start:.1f} s (not cached: data.token_cache=false)")
        return _report(cache, name, noun, rank)  # (the maps outlive the removed files)
    decision = None
    if rank == 0:
        key = cache_key(data_identity(*source), tokenizer, {"stage": name, **settings})
        path = cache_root() / f"{name}-{key[:20]}"
        decision = (str(path), key, _complete(path, key, known), uuid.uuid4().hex[:12])
    path, key, hit, token = _from_main(decision)
    path = Path(path)
    if hit:
        return _report(TokenCache(_appeared(path / "meta.json").parent, f", read from {path}"), name, noun, rank)
    items = records() if callable(records) else records
    meta = {"key": key, "stage": name, "records": len(items), "data": source, "settings": settings}
    tmp = path.with_name(f".{path.name}.{token}.tmp")
    try:
        if world == 1:
            _write_part(tmp, items, 0, len(items), encode, fields, masks, progress, name)
            _finish([tmp], tmp, meta, fields, masks)
            _publish(tmp, path, key, len(items))
        else:
            parts = path.with_name(f".{path.name}.{token}.parts")
            _build_sharded(parts, path, tmp, items, encode, fields, masks, progress, name, meta, rank, world)
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    how = f" on {world} process(es) in {time.perf_counter() - start:.1f} s, cached in {path}"
    return _report(TokenCache(_appeared(path / "meta.json").parent, how), name, noun, rank)


def _report(cache: TokenCache, name: str, noun: str, rank: int) -> TokenCache:
    if rank == 0:
        refused = f" ({cache.refused} skipped: the chat template refused them)" if cache.refused else ""
        print(f"{name}: {len(cache)} {noun} tokenized{cache.origin}{refused}")
    return cache


_REFUSED = object()  # what an encode gives for a record the chat template refused and on_bad skips


def _refusals(encode: Encode, on_bad: str, locate: Locate) -> Encode:
    """``encode`` with a refusing chat template turned into an error naming the record, or
    into a counted skip."""
    def guarded(i: int, record):
        try:
            return encode(i, record)
        except TemplateRefused as e:
            if on_bad != "skip":
                raise UserError(f"{locate(i)}: {e} (data.on_bad=skip skips such records)") from None
            return _REFUSED
    return guarded


def locate_record(source: str, kind: type, split: str, on_bad: str) -> Locate:
    """Where the ``i``-th record :func:`..readers.read_records` gives lies in ``source``
    (found by reading it again: only for an error message)."""
    from collections import Counter

    from .readers import validated_rows

    def locate(i: int) -> str:
        rows = validated_rows(source, kind, split, Counter() if on_bad == "skip" else None)
        return next(at for n, (at, _, _) in enumerate(rows) if n == i)
    return locate


def _build_sharded(parts: Path, path: Path, tmp: Path, items: Sequence, encode: Encode, fields, masks: bool,
                   progress: bool, name: str, meta: dict, rank: int, world: int) -> None:
    """Rank r writes part r under ``parts`` (its block of the records, or the error it met);
    the main rank joins the parts in ``tmp`` and renames it to ``path``; then every rank raises
    the first block's error, if any (the one a single process meets first)."""
    n = len(items)
    lo, hi = rank * n // world, (rank + 1) * n // world
    mine = parts / f"{rank:05d}"
    try:
        _write_part(mine.with_suffix(".tmp"), items, lo, hi, encode, fields, masks, progress and rank == 0, name)
        os.replace(mine.with_suffix(".tmp"), mine)
    except UserError as e:
        write_text(mine.with_suffix(".error"), str(e))
    barrier()
    try:
        found = [_appeared(parts / f"{r:05d}", parts / f"{r:05d}.error") for r in range(world)]
        errors = [p.read_text() for p in found if p.suffix == ".error"]
        if rank == 0 and not errors:
            _finish(found, tmp, meta, fields, masks)
            _publish(tmp, path, meta["key"], meta["records"])
    finally:
        barrier()
        if rank == 0:
            shutil.rmtree(parts, ignore_errors=True)
    if errors:
        raise UserError(errors[0])


def _write_part(folder: Path, items: Sequence, lo: int, hi: int, encode: Encode, fields: Sequence[str],
                masks: bool, progress: bool, name: str) -> None:
    """Tokenize ``items[lo:hi]`` into ``folder``: ids.npy and mask.npy streamed (never whole in
    memory), lengths.npy per sequence, one .npy per field, part.json with the counts."""
    folder.mkdir(parents=True)
    lengths, values, skipped, refused, examples = [], {f: [] for f in fields}, 0, 0, 0
    bar = tqdm(range(lo, hi), desc=f"tokenize ({name})", disable=not progress or hi - lo < 2000,
               dynamic_ncols=True)
    with _NpyWriter(folder / "ids.npy", "<i4") as ids, _NpyWriter(folder / "mask.npy", "|b1", masks) as mask:
        for i in bar:
            example = encode(i, items[i])
            if example is None or example is _REFUSED:
                skipped += example is None
                refused += example is _REFUSED
                continue
            seqs, extra = example
            for s in seqs:
                if masks:
                    ids.write(s.input_ids)
                    mask.write(s.loss_mask)
                else:
                    ids.write(s.input_ids if isinstance(s, Tokenized) else s)
                lengths.append(ids.last)
            for f in fields:
                values[f].append(int(extra[f]))
            examples += 1
    _save(folder / "lengths.npy", np.asarray(lengths, dtype=np.int64))
    for f in fields:
        _save(folder / f"{f}.npy", np.asarray(values[f], dtype=np.int64))
    write_json(folder / "part.json", {"examples": examples, "skipped": skipped, "refused": refused})


def _finish(parts: list[Path], out: Path, meta: dict, fields: Sequence[str], masks: bool) -> None:
    """Join ``parts`` (in order) into the folder ``out`` (which may be the only part itself)."""
    counts = [read_json(p / "part.json") for p in parts]
    lengths = np.concatenate([np.load(p / "lengths.npy") for p in parts])
    examples = sum(c["examples"] for c in counts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    out.mkdir(parents=True, exist_ok=True)
    for name, dtype in (("ids", "<i4"), ("mask", "|b1"))[: 2 if masks else 1]:
        if parts != [out]:
            _join(out / f"{name}.npy", [p / f"{name}.npy" for p in parts], dtype, int(offsets[-1]))
    for f in fields:
        _save(out / f"{f}.npy", np.concatenate([np.load(p / f"{f}.npy") for p in parts]))
    _save(out / "offsets.npy", offsets)
    (out / "lengths.npy").unlink(missing_ok=True)
    (out / "part.json").unlink(missing_ok=True)
    write_json(out / "meta.json", {
        "format": FORMAT_VERSION, **meta, "examples": examples, "skipped": sum(c["skipped"] for c in counts),
        "refused": sum(c.get("refused", 0) for c in counts),
        "sequences_per_example": len(lengths) // examples if examples else 1, "masks": masks,
        "fields": list(fields)})  # written last: the folder is complete


def _publish(tmp: Path, path: Path, key: str, records: int) -> None:
    """Rename the complete folder ``tmp`` to ``path``; one that another run completed in the
    meantime (the same bytes) is kept."""
    if _complete(path, key, records):
        return
    shutil.rmtree(path, ignore_errors=True)  # left incomplete or stale by hand
    try:
        os.replace(tmp, path)
    except OSError:
        if not _complete(path, key, records):  # (another run may have just published it)
            raise


def _complete(path: Path, key: str, records: int | None = None) -> bool:
    try:
        meta = read_json(path / "meta.json")
    except (OSError, ValueError):
        return False
    names = ["ids", "offsets", *(["mask"] if meta.get("masks") else []), *meta.get("fields", [])]
    return (meta.get("format") == FORMAT_VERSION and meta.get("key") == key
            and (records is None or meta.get("records") == records)
            and all((path / f"{n}.npy").is_file() for n in names))


def _appeared(*paths: Path) -> Path:
    """The first of ``paths`` that exists, waiting a little for a network filesystem."""
    deadline = time.monotonic() + WAIT_S
    while True:
        for p in paths:
            if p.exists():
                return p
        if time.monotonic() > deadline:
            raise UserError(f"{paths[0]} was written by another rank but is not visible here: the token "
                            f"cache ({cache_root()}) must be a folder all ranks share; set RLHF_TOKEN_CACHE "
                            "to one, or data.token_cache=false")
        time.sleep(0.2)


def _from_main(obj: Any) -> Any:
    """``obj`` as the main process has it, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- .npy files


def _header(dtype: str, n: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": (n,)})
    assert len(buf.getvalue()) == HEADER, "unexpected .npy header size"
    return buf.getvalue()


class _NpyWriter:
    """A 1-D .npy file written item list by item list (``active=False``: a no-op)."""

    def __init__(self, path: Path, dtype: str, active: bool = True):
        self.path, self.dtype, self.active, self.n, self.last = path, dtype, active, 0, 0

    def __enter__(self) -> _NpyWriter:
        if self.active:
            self.f = open(self.path, "wb")
            self.f.write(_header(self.dtype, 0))
        return self

    def write(self, values: list) -> None:
        self.f.write(np.asarray(values, dtype=self.dtype).tobytes())
        self.n += len(values)
        self.last = len(values)

    def __exit__(self, *exc) -> None:
        if self.active:
            self.f.seek(0)
            self.f.write(_header(self.dtype, self.n))
            _sync_close(self.f)


def _join(out: Path, parts: list[Path], dtype: str, n: int) -> None:
    with open(out, "wb") as f:
        f.write(_header(dtype, n))
        for p in parts:
            with open(p, "rb") as src:
                src.seek(HEADER)
                shutil.copyfileobj(src, f, 1 << 23)
        _sync_close(f)


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        _sync_close(f)


def _sync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()

