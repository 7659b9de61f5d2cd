"""Seeded batch plans: length grouping, sequence packing, and padding into tensors.

A *plan* is a list of micro-batches, each a list of rows, each row a list of example
indices (one index per row unless packed). Plans depend only on (seed, epoch, sizes), so a
resumed run sees exactly the data order of an uninterrupted one.
"""

from __future__ import annotations

import random

import torch

from .chat import IGNORE

# Widths rounded up to a multiple of 8 suit GPU matrix units; on CPU the rounding is only padding.
PAD_MULTIPLE = 8 if torch.cuda.is_available() else 1


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def plan_batches(
    lengths: list[int],
    micro_batch_size: int,
    step_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    pack_length: int = 0,
) -> list[list[list[int]]]:
    """Micro-batches for one epoch, ``step_size`` consecutive micro-batches per optimizer step.

    With ``group_by_length``, examples are sorted by length inside windows of 16 optimizer
    steps and the steps of a window are then shuffled: padding shrinks, while the set of
    examples in each step does not depend on how a step is split into micro-batches (so
    batch 8 x accumulation 1 and batch 2 x accumulation 4 see the same data).
    With ``pack_length`` > 0, examples are first packed into rows of at most that many tokens.
    """
    order = epoch_order(len(lengths), seed, epoch)
    rows = _pack(order, lengths, pack_length) if pack_length else [[i] for i in order]
    per_step = micro_batch_size * step_size
    if group_by_length:
        rng = random.Random(f"{seed}/{epoch}/groups")
        window = per_step * 16
        grouped = []
        for w in range(0, len(rows), window):
            chunk = sorted(rows[w : w + window], key=lambda r: -sum(lengths[i] for i in r))
            steps = [chunk[s : s + per_step] for s in range(0, len(chunk), per_step)]
            full, last = (steps[:-1], steps[-1:]) if len(steps[-1]) < per_step else (steps, [])
            rng.shuffle(full)
            grouped.extend(r for step in full + last for r in step)
        rows = grouped
    return [rows[b : b + micro_batch_size] for b in range(0, len(rows), micro_batch_size)]


def _pack(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit packing in the shuffled order (searching the 64 most recent open rows)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = min(lengths[i], capacity)
        for j in range(max(0, len(rows) - 64), len(rows)):
            if free[j] >= n:
                rows[j].append(i)
                free[j] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def collate_rows(
    rows: list[list[tuple[list[int], list[int]]]], pad_id: int, pad_to_multiple: int = PAD_MULTIPLE
) -> dict[str, torch.Tensor]:
    """Pad rows of (input_ids, targets) sequences into tensors.

    ``seq_ids`` numbers the sequences of a row from 1 (0 = padding); ``position_ids``
    restart at 0 for each packed sequence, so a packed row computes exactly what its
    sequences would compute alone (given the block-diagonal mask of
    :func:`..models.attention.attention_mask`).
    """
    lens = [sum(len(ids) for ids, _ in row) for row in rows]
    width = -(-max(lens) // pad_to_multiple) * pad_to_multiple
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    seq_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for k, (ids, tgt) in enumerate(row, start=1):
            n = len(ids)
            input_ids[r, t : t + n] = torch.tensor(ids)
            targets[r, t : t + n] = torch.tensor(tgt)
            seq_ids[r, t : t + n] = k
            position_ids[r, t : t + n] = torch.arange(n)
            t += n
    start, at = target_positions(targets)
    return {
        "input_ids": input_ids,
        "targets": targets,
        "seq_ids": seq_ids,
        "position_ids": position_ids,
        "packed": any(len(row) > 1 for row in rows),
        "target_start": start,
        "target_at": at,
    }


def target_positions(targets: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(the first column holding a target, the flat indices of the targets in the columns
    from there on): computed on the host with the batch, so the forward needs no device sync."""
    keep = targets != IGNORE
    cols = keep.any(0).nonzero()
    start = int(cols[0]) if len(cols) else 0
    return start, keep[:, start:].flatten().nonzero()[:, 0]
