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


def test_sft_model_reloads_in_plain_transformers(sft_model, real_model, data, tier):
    """Loaded by plain transformers, the saved model has learnt what SFT taught: its loss on the
    training conversations (rendered by transformers' own chat template) is well below the
    starting model's. Every later stage's loader reads the same weights."""
    import json

    import transformers

    plain, tok = tier.assert_plain_reload(sft_model, real_model)
    start = transformers.AutoModelForCausalLM.from_pretrained(real_model)
    rows = [json.loads(x) for x in (data / "sft.jsonl").read_text().splitlines()[:16]]

    def encoded(messages):  # labels: the assistant's reply and what ends it
        ids = tok.apply_chat_template(messages, return_dict=True)["input_ids"]
        prompt = len(tok.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=True)["input_ids"])
        return torch.tensor([ids]), torch.tensor([[-100] * prompt + ids[prompt:]])

    def loss(model) -> float:
        with torch.no_grad():
            return sum(model(ids, labels=labels).loss.item() for ids, labels in map(encoded, (
                r["messages"] for r in rows))) / len(rows)

    assert loss(plain) < 0.8 * loss(start)
    seqs = tier.chat_inputs(tok)
    ours = load_model(ModelConfig(path=str(sft_model)))  # as every later stage loads it
    for a, b in zip(tier.logits_of(plain, seqs), tier.logits_of(ours, seqs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
