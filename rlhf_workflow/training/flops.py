"""Model FLOPs of a training step, and the device's peak they are measured against (MFU).

Per trained token a forward and backward pass costs 6N FLOPs, N the parameters that take
part in a matrix product (all of them but an untied input embedding, a lookup), plus the
attention: 12 x layers x hidden per (query, key) pair the mask lets it compute, counted exactly
from the batch (a causal sequence of n tokens: n(n+1)/2 pairs; a shared-prompt pair's second
response sees the prompt and itself only). Recomputation (activation checkpointing) is not
counted: MFU counts the model's FLOPs, not the hardware's.

The peak is ``train.peak_tflops`` per device when set (a datasheet figure: 989 for an H100's
dense bf16), else measured once at the start with a short run of square matrix products in
the compute dtype: an attainable peak, a little below the datasheet's.
"""

from __future__ import annotations

import time

import torch


def matmul_params(model) -> int:
    """Parameters that take part in a matrix product, counted whole under FSDP2 (DTensor) and
    ZeRO-3 (``ds_numel``)."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    inner = getattr(model, "module", model)
    emb = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if emb is not None and (head is None or head.weight is not emb.weight):
        total -= getattr(emb.weight, "ds_numel", emb.weight.numel())
    return total


def attended_pairs(batch: dict) -> int:
    """(query, key) pairs the batch's attention mask allows: per sequence (``seq_ids``, or a
    padding mask's 1s), per shared-prompt branch (prompt p, chosen c, rejected r: the chosen
    sees the prompt and its own past, so does the rejected)."""
    seq = batch.get("seq_ids", batch.get("attention_mask"))
    rows, k = len(seq), int(seq.max()) + 1
    key = torch.arange(rows)[:, None] * k + seq
    branch = batch.get("branch")
    if branch is None:
        n = torch.bincount(key.flatten(), minlength=rows * k).view(rows, k)[:, 1:].double()
        return int((n * (n + 1) / 2).sum())
    counts = torch.bincount((key * 3 + branch).flatten(), minlength=rows * k * 3).view(rows, k, 3)[:, 1:].double()
    p, c, r = counts.unbind(-1)
    return int((p * (p + 1) / 2 + c * (p + (c + 1) / 2) + r * (p + (r + 1) / 2)).sum())


def step_flops(params: int, config, batches: list[dict]) -> float:
    """Training FLOPs of ``batches`` (forward and backward) for a model of ``params`` matmul
    parameters and the transformers ``config``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    per_pair = 12 * getattr(text, "num_hidden_layers", 0) * getattr(text, "hidden_size", 0)
    return float(sum(6 * params * b["num_tokens"] + per_pair * attended_pairs(b) for b in batches))


def measured_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of square matrix products in ``dtype`` on ``device``: a short measurement."""
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
