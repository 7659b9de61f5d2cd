"""Loss functions: pure functions of logits or log-prob tensors, one per objective.

Shapes: B = batch, T = sequence length, V = vocabulary. Every loss returns a *sum* over
the items it covers (tokens or pairs); the training loop divides by the number of items in
the whole optimizer step, which makes gradient accumulation exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.chat import IGNORE


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood.

    ``logits`` (B, T, V) at position t predict ``targets`` (B, T) at t, already shifted;
    positions with target -100 (prompt, padding, sequence ends) are skipped.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
