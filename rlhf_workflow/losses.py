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


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability of the target tokens, (B, T, V) x (B, T) -> (B,).

    Summed over the positions whose target is not -100 (the response tokens), or averaged
    over them with ``average`` (SimPO-style length normalisation).
    """
    mask = targets != IGNORE
    logps = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bradley-Terry reward-model loss per pair, ``-log sigmoid(r_c - r_r - margin)``, (N,).

    Ouyang et al. 2022; the margin term is Llama-2's (Touvron et al. 2023), 0 by default.
    """
    return -F.logsigmoid(chosen.float() - rejected.float() - margin)
