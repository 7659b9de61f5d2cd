"""The one place that decides this process's world and device, and runs batched inference
over it.

Every command calls :func:`setup`: launched by ``torchrun`` (or ``accelerate launch``) it
joins the process group the environment describes (NCCL on GPUs, gloo on CPU) with the
configured timeout; alone it is rank 0 of 1. The device is the process's GPU when there is
one, else the CPU. :func:`run_batched` is the batched-inference loop every scorer shares:
sort by length, batch, deal the batches out to the ranks, run, gather in the caller's order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


def setup(timeout_minutes: float = 30.0, group_of_one: bool = False,
          accelerator: bool = True) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. ``group_of_one`` creates a process group
    even for a process running alone (FSDP and DeepSpeed need one). ``accelerator=False``
    keeps the process off the GPU (one that only starts others, like vLLM's engine workers):
    it joins with gloo and its device is the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = accelerator and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if (world > 1 or group_of_one) and not dist.is_initialized():
        if world == 1:
            for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())),
                               ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if cuda else None)
    rank, world = rank_and_world()
    return rank, world, device


def device() -> torch.device:
    """This process's device (joining the launcher's process group if there is one)."""
    return setup()[2]


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(value) -> list:
    """``value`` from every rank, in rank order (a collective: each rank waits for all)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over ranks (in place, and returned)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the weights are sharded over the ranks (FSDP2): every rank must then run every
    forward pass together (:func:`run_batched` with ``shard``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_batched(lengths: Sequence[int], batch_size: int, fn: Callable[[list[int]], torch.Tensor],
                shard: bool = True, desc: str | None = None, sort: bool = True) -> torch.Tensor:
    """``fn(indices)`` -> a (len(indices), ...) tensor of values for a batch of items; returns
    the (N, ...) values of all N items in their order, as fp32 on the CPU, computed without
    gradients.

    Items are sorted longest first (less padding; ``sort=False`` keeps their order) and cut
    into batches of ``batch_size``.
    With ``shard`` and a process group, batch b runs on rank ``b % world`` and the results are
    summed across ranks (each item is computed by one rank only); every rank runs the same
    number of batches, a rank that has run out repeating the first one with its results
    dropped, so wrappers that communicate inside the forward (FSDP, ZeRO-3) stay in step.
    """
    if not lengths:
        return torch.zeros(0)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    rank, world = rank_and_world() if shard else (0, 1)
    mine = batches[rank::world]
    out = None
    with torch.no_grad(), tqdm(total=len(lengths), desc=desc, disable=desc is None or rank != 0,
                                dynamic_ncols=True) as bar:
        for k in range(math.ceil(len(batches) / world)):
            idx = mine[k] if k < len(mine) else batches[0]
            values = fn(idx).float()
            if out is None:
                out = torch.zeros((len(lengths), *values.shape[1:]), device=values.device)
            if k < len(mine):
                out[idx] = values
            bar.update(min(world * len(idx), bar.total - bar.n))
    return (all_sum(out) if world > 1 else out).cpu()
