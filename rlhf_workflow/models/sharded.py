"""Each rank its share of a model: loaded by building it on the meta device, sharding it and
reading each rank's slices straight from the safetensors files; exported tensor by tensor.

Loaded the plain way, an 8B model costs every rank the whole fp32 model in host memory (32 GB,
8 times on a node) and, for a moment, on its GPU. Here a rank allocates only its own shards
(FSDP2's ``fully_shard`` splits each weight by rows over the ranks) and reads just those rows
with safetensors' slice reads, tensor by tensor: its peak is its share plus one slice.

- Weights the checkpoint lacks (a new reward head) are initialised as ``from_pretrained``
  initialises them: the model's ``_init_weights`` on the global RNG, module by module; every
  rank computes the same small tensor and keeps its slice.
- Rows beyond the checkpoint's (an embedding grown for a new pad token) start at zero.
- Non-persistent buffers (rotary frequencies) are computed on the CPU when the model is built
  and copied back once the shards are allocated; a tied LM head shares the embedding's shards.
- A checkpoint whose weight names are not the model's (architectures that transformers
  converts on load), a GGUF file or a hub name is not read this way: :func:`load_sharded` says
  so (None) and the caller loads it whole.

Export (:func:`save_streamed`) gathers one tensor at a time on every rank and the main process
writes them into safetensors files of at most ``max_file_bytes`` as they fill, with the
index transformers reads: no process ever holds the whole state dict.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import ModelConfig
from ..faults import point
from ..io import replace_dir
from .loading import DTYPES, split_gguf

MISSING_LIMIT = 0.01  # new weights (heads) beyond this share of the model: names do not match


def checkpoint_files(path: str | Path) -> list[Path] | None:
    """The safetensors files of a local model folder, or None (a hub name, a GGUF file)."""
    p = Path(path).expanduser()
    if split_gguf(str(path))[1] or not p.is_dir():
        return None
    index = p / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [p / n for n in names]
    files = sorted(p.glob("*.safetensors"))
    return files or None


def load_sharded(spec: ModelConfig, shard: Callable[[torch.nn.Module], None], device: torch.device,
                 head: str = "causal_lm", prepare: Callable[[torch.nn.Module], None] | None = None,
                 **config_kwargs) -> tuple[torch.nn.Module, list[str]] | None:
    """(model sharded by ``shard`` with each rank's share read from ``spec.path``, names of the
    weights newly initialised), or None when the checkpoint cannot be read this way (not a
    local safetensors folder, or its weight names are not the model's). ``prepare(model)`` runs
    on the empty model before it is sharded (e.g. growing the embedding for a new token)."""
    files = checkpoint_files(spec.path)
    if files is None:
        return None
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code, **config_kwargs)
    extra = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code,
                                **extra)
    model.tie_weights()
    model.config.name_or_path = spec.path
    names = _checkpoint_names(files)
    owned = list(_owned(model))
    missing = sum(t.numel() for _, t, aliases in owned if _lookup(aliases, names) is None)
    if missing > MISSING_LIMIT * sum(t.numel() for _, t, _ in owned):
        return None
    if prepare is not None:
        prepare(model)
    fresh = _initialise_missing(model, names)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    shard(model)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        _fill(model, files, names, fresh)
    return model, sorted(fresh)


def save_streamed(model: torch.nn.Module, tokenizer, out: str | Path, gather: Callable[[torch.Tensor], torch.Tensor],
                  is_main: bool, dtype: str | None = None, max_file_bytes: int = 5 * 2**30) -> None:
    """Write ``model`` (sharded) as a Hugging Face folder at ``out``, atomically. Every rank calls
    it: ``gather(tensor)`` returns the whole tensor (a collective); the main process writes it.
    A tied weight is written once, under its first name; ``dtype`` converts floating weights."""
    from safetensors.torch import save_file

    target = DTYPES[dtype] if dtype else None
    items = [(name, t) for name, t, _ in _owned(model)]
    size = [getattr(t, "ds_numel", t.numel()) * (target or t.dtype).itemsize for _, t in items]  # (ZeRO-3: ds_numel)
    files: list[list[int]] = [[]]
    filled = 0
    for i, n in enumerate(size):
        if files[-1] and filled + n > max_file_bytes:
            files.append([])
            filled = 0
        files[-1].append(i)
        filled += n
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if is_main:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    weight_map, written = {}, []
    for name, group in zip(names, files, strict=True):
        part = {}
        for i in group:
            key, tensor = items[i]
            with torch.no_grad():
                full = gather(tensor)
            if is_main:
                convert = target if target is not None and full.is_floating_point() else full.dtype
                full = full.to("cpu", convert, copy=True)  # (its own storage: a gathered one may be a view)
                part[key] = full
                weight_map[key] = name
                written.append(full.dtype)
            del full
        if is_main:
            save_file(part, str(tmp / name), metadata={"format": "pt"})
    if not is_main:
        return
    if len(files) > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(size)}, "weight_map": weight_map}, indent=2) + "\n")
    config = model.config
    config.dtype = next(d for d in written if d.is_floating_point)
    config.architectures = [type(model).__name__.removeprefix("FSDP")]  # (FSDP2 renames the class)
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    point("export")
    replace_dir(tmp, out)


# --------------------------------------------------------------------------- internals


def _checkpoint_names(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    names = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            names.update({k: f for k in handle.keys()})
    return names


def _owned(model: torch.nn.Module):
    """(name, tensor, all names of that tensor) for each parameter and persistent buffer once."""
    aliases: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        tensors[id(p)] = p
    persistent = set(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            aliases.setdefault(id(b), []).append(name)
            tensors[id(b)] = b
    for key, names in aliases.items():
        yield names[0], tensors[key], names


def _lookup(aliases: list[str], names: dict[str, Path]) -> str | None:
    """The checkpoint's name of a weight: one of its own names, with or without the base
    model's prefix (a base-model checkpoint loaded under a task head)."""
    for name in aliases:
        for candidate in (name, name.partition(".")[2], f"model.{name}"):
            if candidate in names:
                return candidate
    return None


def _initialise_missing(model: torch.nn.Module, names: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Full initial values (CPU) of the weights the checkpoint lacks, by the model's own
    ``_init_weights`` on the global RNG; their modules go back to the meta device."""
    missing = {name for name, _, aliases in _owned(model) if _lookup(aliases, names) is None}
    values: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(prefix=module_name, recurse=False)]
        if not any(n.removeprefix(".") in missing for n in own):
            continue
        module.to_empty(device="cpu", recurse=False)
        model._init_weights(module)
        for n, p in module.named_parameters(prefix=module_name, recurse=False):
            values[n.removeprefix(".")] = p.detach().clone()
        module.to("meta")
    return values


def _local(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """This rank's part of a (possibly sharded) tensor and its offset in the whole one."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(offset)
    return t, (0,) * t.ndim


def _fill(model: torch.nn.Module, files: list[Path], names: dict[str, Path],
          fresh: dict[str, torch.Tensor]) -> None:
    """Copy each rank's slices into its shards: from the checkpoint, or from ``fresh``."""
    from safetensors import safe_open

    by_file: dict[Path, list] = {}
    for name, tensor, aliases in _owned(model):
        local, offset = _local(tensor)
        if name in fresh:
            region = tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))
            local.copy_(fresh[name][region])
            continue
        key = _lookup(aliases, names)
        by_file.setdefault(names[key], []).append((key, local, offset))
    for f in files:
        with safe_open(str(f), "pt") as handle:
            for key, local, offset in by_file.get(f, []):
                _read_slice(handle.get_slice(key), key, local, offset)


def _read_slice(source, key: str, local: torch.Tensor, offset: tuple[int, ...]) -> None:
    """Rows [offset, offset + len) of ``source`` into ``local``; rows past the checkpoint's are
    zero (a grown embedding). Every other dimension must match."""
    shape = source.get_shape()
    if any(offset[1:]) or len(shape) != local.ndim or any(a != b for a, b in zip(shape[1:], local.shape[1:], strict=True)):
        raise ValueError(f"checkpoint weight {key} has shape {tuple(shape)}; the model's part is "
                         f"{tuple(local.shape)} at offset {offset}")
    if local.ndim == 0:
        local.copy_(source[()])
        return
    start = offset[0]
    stop = min(start + local.shape[0], shape[0])
    local.zero_()
    if stop > start:
        local[: stop - start].copy_(source[start:stop])
