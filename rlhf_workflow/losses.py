"""Loss functions: pure functions of rewards or log-prob tensors, one per objective.

Token log-probs come from :mod:`.models.logprobs` (never a full-vocabulary tensor). Losses
return per-item values the caller sums; the training loop divides by the number of items in
the whole optimizer step, which makes gradient accumulation exact.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bradley-Terry reward-model loss per pair, ``-log sigmoid(r_c - r_r - margin)``, (N,).

    Ouyang et al. 2022; the margin term is Llama-2's (Touvron et al. 2023), 0 by default.
    """
    return -F.logsigmoid(chosen.float() - rejected.float() - margin)


# --------------------------------------------------------------------------- DPO family
#
# Every function below takes per-sequence log-probs, each (N,) for N pairs: the policy's
# ``chosen``/``rejected`` and, where the variant has one, the reference's ``ref_chosen`` /
# ``ref_rejected``. It returns ``(losses, chosen_rewards, rejected_rewards)``, all (N,):
# unreduced losses (the caller sums them) and the implicit rewards, detached.
# ``h = (chosen - ref_chosen) - (rejected - ref_rejected)`` is the log-ratio margin.


class DPOLoss(str, Enum):
    """The preference losses :func:`dpo_loss` can compute, and what each one needs."""

    SIGMOID = "sigmoid"
    IPO = "ipo"
    HINGE = "hinge"
    SIMPO = "simpo"

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs (SimPO is reference-free)."""
        return self is not DPOLoss.SIMPO

    @property
    def averages_logps(self) -> bool:
        """Whether the loss reads per-token averaged log-probs instead of summed ones.

        IPO's squared loss grows with response length on summed log-probs; like TRL (a choice
        its authors confirmed), we feed it per-token averages. SimPO is defined on averages.
        """
        return self in (DPOLoss.IPO, DPOLoss.SIMPO)

    @property
    def default_beta(self) -> float:
        """beta where the config leaves it unset: 0.1 (the paper's DPO; IPO's tau, the hinge's
        margin scale), 2.0 for SimPO (its paper's range is 2 to 10)."""
        return 2.0 if self is DPOLoss.SIMPO else 0.1


def _rewards(beta: float, chosen: torch.Tensor, rejected: torch.Tensor):
    return beta * chosen.detach(), beta * rejected.detach()


def dpo_sigmoid_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023): ``-log sigmoid(beta * h)``.

    With ``label_smoothing`` eps > 0, conservative DPO (Mitchell 2023, "A note on DPO with
    noisy preferences"): the label is flipped with probability eps,
    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    Rewards ``beta * (logp - ref_logp)``.
    """
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    return (losses, *_rewards(beta, chosen - ref_chosen, rejected - ref_rejected))


def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1):
    """IPO (Azar et al. 2023, "A general theoretical paradigm...", Eq. 17): ``(h - 1/(2 beta))^2``.

    ``beta`` is the paper's tau: h is regressed to the margin 1/(2 tau) instead of pushed to
    infinity, which keeps the policy near the reference even on deterministic preferences.
    Meant for per-token averaged log-probs (see :attr:`DPOLoss.averages_logps`).
    """
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    losses = (h - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(beta, chosen - ref_chosen, rejected - ref_rejected))


def hinge_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float = 0.1):
    """Hinge loss of SLiC (Zhao et al. 2023) as normalised in RSO (Liu et al. 2023, Eq. 7):
    ``max(0, 1 - beta * h)``; 1/beta is the log-ratio margin the pair must clear."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    losses = torch.relu(1 - beta * h)
    return (losses, *_rewards(beta, chosen - ref_chosen, rejected - ref_rejected))


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 2.0, gamma: float = 1.0):
    """SimPO (Meng, Xia, Chen 2024), reference-free:
    ``-log sigmoid(beta * (avg_chosen - avg_rejected) - gamma)``.

    ``chosen``/``rejected`` are per-token *averaged* log-probs ``log pi(y|x) / |y|``; gamma
    is the target reward margin. Rewards ``beta * avg_logp`` (the paper's implicit reward).
    The paper uses beta in [2, 10] and gamma/beta in [0.3, 0.8].
    """
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return (losses, *_rewards(beta, chosen, rejected))


def rpo_nll(chosen_avg_logps: torch.Tensor, weight: float) -> torch.Tensor:
    """RPO's added term (Pang et al. 2024, "Iterative reasoning preference optimization"):
    ``weight * NLL(y_chosen | x) / |y_chosen|``, i.e. ``-weight * avg_chosen_logp``, (N,).

    Added to any loss above; it keeps the chosen response's likelihood from falling, which
    plain DPO allows as long as the rejected one falls faster.
    """
    return -weight * chosen_avg_logps


def dpo_loss(kind: DPOLoss, chosen: torch.Tensor, rejected: torch.Tensor,
             ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
             beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 1.0):
    """Dispatch to the function of ``kind`` (log-probs summed or averaged as it expects)."""
    if kind is DPOLoss.SIMPO:
        return simpo_loss(chosen, rejected, beta, gamma)
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"loss {kind.value!r} needs reference log-probs")
    if kind is DPOLoss.SIGMOID:
        return dpo_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    if kind is DPOLoss.IPO:
        return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    return hinge_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
