"""Reference log-probs for DPO: computed once, before training, and cached on disk.

The reference model's summed response log-probs of every pair are computed in one no-grad
pass over the micro-batches training's first epoch will run (optional bf16 autocast) and
saved as an (N, 2) tensor, index aligned with the pairs, column 0 = chosen, 1 = rejected. The file name carries a key that
hashes what the numbers depend on: the reference weights' identity, the dtype of the pass,
and the exact token sequences of the pairs (which already reflect the tokenizer, the chat
template, the data and the truncation limits). A second epoch reads the tensor from memory;
a resumed or repeated run with the same key reads the file; nothing is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load, save
from tqdm.auto import tqdm

from ..data.pairs import TokenizedPair, collate_pairs
from ..distributed import all_sum, rank_and_world, to_device
from ..io import atomic_open
from ..models.logprobs import response_logps

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_identity(path: str | Path) -> dict:
    """What identifies a checkpoint cheaply: its config.json and its weight files' sizes and
    modification times (a hub name stands for itself)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return {"name": str(path)}
    config = p / "config.json"
    files = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    return {
        "config": config.read_text() if config.is_file() else None,
        "weights": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
    }


def cache_key(identity: dict, dtype: str, tokens: str) -> str:
    """The key of a reference pass: the reference's identity, the dtype and batching of the pass,
    and a digest of the pairs' tokens."""
    blob = {"reference": identity, "dtype": dtype, "tokens": tokens}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def compute_reference_logps(model, pairs: list[TokenizedPair], pad_id: int, steps: list[tuple[list, int]],
                            autocast: str | None = None, progress: bool = True,
                            shared: bool = False) -> torch.Tensor:
    """(N, 2) summed response log-probs of ``pairs`` under ``model`` (chosen, rejected),
    computed on this rank's micro-batches of training's first epoch (``steps``, from
    :meth:`..loop.StepPlan.first_epoch`: (micro-batches of rows, how many are real) per step),
    in the shared-prompt layout with ``shared``, under ``autocast`` ("bf16"/"fp16").

    A pair is padded into exactly the batch training will first run it in, so with the policy
    as its own reference the first epoch's log-probs are bit for bit training's (its first
    loss is log 2 at any precision; in bf16 a log-prob depends on the batch around it). Every
    rank runs as many forward passes (fillers included: FSDP2 and ZeRO-3 gather weights inside
    them) and the result is summed over the ranks. A PEFT model runs with its adapters disabled.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast or "")
    out = torch.zeros((len(pairs), 2), device=device)
    bar = tqdm(steps, desc="reference log-probs", unit="step", disable=not progress or rank_and_world()[0] != 0,
               dynamic_ncols=True)
    with torch.no_grad(), adapters_off, torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for batches, real in bar:
            for k, rows in enumerate(batches):
                idx = [i for row in rows for i in row]
                batch = to_device(collate_pairs([pairs[i] for i in idx], pad_id, shared, [len(r) for r in rows]),
                                  device)
                logps = torch.stack(response_logps(model, batch).chunk(2), dim=1).float()
                if k < real:
                    out[idx] = logps
    model.train(was_training)
    return all_sum(out).cpu()


def in_batches(n: int, size: int) -> list[tuple[list, int]]:
    """One process's ``steps`` for :func:`compute_reference_logps`: the n pairs in order, in
    micro-batches of ``size``."""
    return [([[[i] for i in range(lo, min(lo + size, n))]], 1) for lo in range(0, n, size)]


def cache_path(out_dir: str | Path, key: str) -> Path:
    return Path(out_dir) / f"ref_logps-{key[:16]}.safetensors"


def load_cache(path: Path, key: str, n: int) -> torch.Tensor | None:
    """The cached tensor, or None when the file is missing or was made for other inputs."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("key") != key:
        return None
    logps = load(path.read_bytes())["logps"]
    return logps if logps.shape == (n, 2) else None


def save_cache(path: Path, key: str, logps: torch.Tensor, reference: str) -> None:
    data = save({"logps": logps.contiguous()}, metadata={"key": key, "reference": reference})
    with atomic_open(path, "wb") as f:
        f.write(data)
