"""Where vLLM engines run: the GPUs this process may use, cut into groups of
``tensor_parallel_size`` consecutive devices, one group per engine.

The devices are named as the job was given them (``CUDA_VISIBLE_DEVICES`` from SLURM or the
user: indices like ``4,5,6,7`` or UUIDs like ``GPU-8f3c...``) and passed on unchanged, so an
engine's worker sees exactly its group and nothing else.
"""

from __future__ import annotations

import os

from ..errors import UserError


def visible_devices() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set (empty entries
    dropped), else every device torch sees, as indices."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def engine_groups(visible: list[str], tensor_parallel_size: int, engines: int = 0) -> list[list[str]]:
    """``visible`` cut into consecutive groups of ``tensor_parallel_size`` devices, one per
    engine: as many as fit (``engines=0``) or the first ``engines``.

    >>> engine_groups(["0", "1", "2", "3"], 2)
    [['0', '1'], ['2', '3']]
    """
    tp = tensor_parallel_size
    if not visible:
        raise UserError("backend=vllm: no GPU is visible (CUDA_VISIBLE_DEVICES is empty and torch sees none)")
    if len(visible) % tp:
        raise UserError(f"backend=vllm: the {len(visible)} visible GPU(s) ({','.join(visible)}) do not split into "
                        f"engines of vllm.tensor_parallel_size={tp}; give the job a multiple of {tp} GPUs")
    fit = len(visible) // tp
    if engines > fit:
        raise UserError(f"backend=vllm: vllm.engines={engines} engines of vllm.tensor_parallel_size={tp} need "
                        f"{engines * tp} GPUs, {len(visible)} are visible ({','.join(visible)})")
    return [visible[i * tp : (i + 1) * tp] for i in range(engines or fit)]
