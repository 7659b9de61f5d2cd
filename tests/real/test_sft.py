"""`rlhf sft` on the pretrained model: the loss falls and the saved model is a plain HF folder."""

from __future__ import annotations

import pytest
import torch

from rlhf_workflow.config import ModelConfig
from rlhf_workflow.models.loading import load_model

pytestmark = pytest.mark.real


def test_sft_loss_falls(sft_model, tier):
    losses = [m["loss"] for m in tier.metrics(sft_model.parent) if "loss" in m]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0], losses  # the sandbox's "Answer: X" format is learnt fast


def test_sft_model_reloads_in_plain_transformers(sft_model, real_model, tier):
    plain, tok = tier.assert_plain_reload(sft_model, real_model)
    seqs = tier.chat_inputs(tok)
    ours = load_model(ModelConfig(path=str(sft_model)))  # as every later stage loads it
    start = load_model(ModelConfig(path=str(real_model)))
    for a, b, s in zip(tier.logits_of(plain, seqs), tier.logits_of(ours, seqs), tier.logits_of(start, seqs),
                       strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert (a - s).abs().max() > 1e-2  # the trained weights, not the starting ones
