"""The DPO-family losses: hand-computed values, properties, and agreement with TRL's DPOTrainer."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhf_workflow.losses import (
    DPOLoss,
    dpo_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    rpo_nll,
    simpo_loss,
)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# policy chosen -1, rejected -3; reference -2 for both: log-ratios +1 and -1, margin h = 2
PAIR = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))


def test_sigmoid_by_hand():
    losses, rc, rr = dpo_sigmoid_loss(*PAIR, beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)))  # -log sigmoid(0.5 * 2)
    assert (rc.item(), rr.item()) == (0.5, -0.5)
    smoothed, _, _ = dpo_sigmoid_loss(*PAIR, beta=0.5, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(0.8 * math.log(1 + math.exp(-1)) + 0.2 * math.log(1 + math.e))


def test_ipo_by_hand():
    assert ipo_loss(*PAIR, beta=0.25)[0].item() == pytest.approx(0.0)  # h == 1 / (2 * 0.25)
    assert ipo_loss(*PAIR, beta=0.5)[0].item() == pytest.approx(1.0)  # (2 - 1)^2
    assert ipo_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1)[0].item() == pytest.approx(25.0)


def test_hinge_by_hand():
    assert hinge_loss(*PAIR, beta=0.25)[0].item() == pytest.approx(0.5)  # 1 - 0.25 * 2
    assert hinge_loss(*PAIR, beta=1.0)[0].item() == 0.0  # margin cleared


def test_simpo_and_rpo_by_hand():
    losses, rc, rr = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=1.0)
    assert losses.item() == pytest.approx(math.log(2))  # -log sigmoid(2 * 0.5 - 1)
    assert (rc.item(), rr.item()) == (-1.0, -2.0)
    assert rpo_nll(t(-0.5, -2.0), weight=2.0).tolist() == [1.0, 4.0]


def test_dispatch_and_what_each_loss_needs():
    assert [k.needs_reference for k in DPOLoss] == [True, True, True, False]
    assert [k.averages_logps for k in DPOLoss] == [False, True, False, True]
    assert dpo_loss(DPOLoss.HINGE, *PAIR, beta=0.25)[0].item() == pytest.approx(0.5)
    assert dpo_loss(DPOLoss.SIMPO, t(-0.5), t(-1.0), None, None, beta=2.0, gamma=1.0)[0].item() == (
        pytest.approx(math.log(2)))
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(DPOLoss.SIGMOID, t(-1.0), t(-2.0), None, None)


@pytest.mark.parametrize("kind", list(DPOLoss))
def test_preferring_the_chosen_lowers_the_loss_and_rewards_are_detached(kind):
    chosen, rejected = t(-2.0).requires_grad_(), t(-2.0).requires_grad_()
    losses, rc, rr = dpo_loss(kind, chosen, rejected, t(-2.0), t(-2.0), beta=0.5)
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises chosen, lowers rejected
    assert not rc.requires_grad and not rr.requires_grad
    better, _, _ = dpo_loss(kind, t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert better.item() <= losses.item()


# --------------------------------------------------------------------------- against TRL


def _trl_loss(loss_type: str, beta: float, chosen_tok, rejected_tok, mask_c, mask_r, ref_c, ref_r):
    """TRL's own ``DPOTrainer._compute_loss`` (trl >= 1.0), on a stub model that returns the
    given per-token log-probs: the loss code that runs is TRL's, unchanged."""
    from trl import DPOTrainer

    n, width = chosen_tok.shape
    per_token = torch.cat([chosen_tok * mask_c, rejected_tok * mask_r])  # (2N, T)
    completion = torch.cat([torch.zeros(2 * n, 1), torch.cat([mask_c, mask_r])], dim=1)  # unshifted

    def stub_model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())

    stub_model.training = True
    same = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=stub_model, accelerator=SimpleNamespace(device="cpu", gather=same, gather_for_metrics=same),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(2 * n, width + 1, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, width + 1, dtype=torch.long),
              "completion_mask": completion.long(), "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return DPOTrainer._compute_loss(trainer, stub_model, inputs, return_outputs=False)


def _probe_trl() -> None:
    """Skip (only) when TRL's loss entry point is not the one the stub above drives; an error
    inside TRL's computation is a failure."""
    import inspect

    trl = pytest.importorskip("trl")
    fn = getattr(trl.DPOTrainer, "_compute_loss", None)
    params = list(inspect.signature(fn).parameters) if fn is not None else []
    if params[:4] != ["self", "model", "inputs", "return_outputs"]:
        pytest.skip(f"trl {trl.__version__}: DPOTrainer._compute_loss is not (self, model, inputs, "
                    "return_outputs); the parity holds for the pinned trl (constraints.txt)")


@pytest.mark.parametrize("kind", [DPOLoss.SIGMOID, DPOLoss.IPO, DPOLoss.HINGE])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl_on_random_inputs(kind, beta):
    _probe_trl()
    g = torch.Generator().manual_seed(int(beta * 10) + len(kind.value))
    n, width = 16, 12
    chosen_tok = -torch.rand(n, width, generator=g, dtype=torch.float64) * 3
    rejected_tok = -torch.rand(n, width, generator=g, dtype=torch.float64) * 3
    lens_c = torch.randint(1, width + 1, (n,), generator=g)
    lens_r = torch.randint(1, width + 1, (n,), generator=g)
    mask_c = (torch.arange(width) < lens_c[:, None]).double()
    mask_r = (torch.arange(width) < lens_r[:, None]).double()
    ref_c = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    ref_r = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    expected = _trl_loss(kind.value, beta, chosen_tok, rejected_tok, mask_c, mask_r, ref_c, ref_r)

    chosen, rejected = (chosen_tok * mask_c).sum(1), (rejected_tok * mask_r).sum(1)
    if kind.averages_logps:  # per-token averages, of the policy and of the reference alike
        chosen, rejected = chosen / lens_c, rejected / lens_r
        ref_c, ref_r = ref_c / lens_c, ref_r / lens_r
    losses, _, _ = dpo_loss(kind, chosen, rejected, ref_c, ref_r, beta=beta)
    assert losses.mean().item() == pytest.approx(expected.item(), abs=1e-6, rel=1e-6)
