"""Model FLOPs for MFU: (query, key) pairs counted from the batch equal what the attention
mask allows, matmul parameters by hand, and the logged MFU is the tokens' FLOPs over the
measured peak."""

from __future__ import annotations

import json

import torch

from rlhf_workflow.config import ModelConfig
from rlhf_workflow.data.batching import collate_rows
from rlhf_workflow.data.chat import Tokenized
from rlhf_workflow.data.pairs import TokenizedPair, collate_pairs
from rlhf_workflow.models.attention import attention_mask
from rlhf_workflow.models.loading import load_model
from rlhf_workflow.training.flops import attended_pairs, matmul_params
from rlhf_workflow.training.sft import run_sft

from .test_loop import _cfg, _records


def _pair(prompt: int, chosen: int, rejected: int) -> TokenizedPair:
    def tok(n, first):
        return Tokenized(list(range(1, prompt + 1)) + [first] * n, [False] * prompt + [True] * n)

    return TokenizedPair(tok(chosen, 50), tok(rejected, 60), False)


def _allowed(batch) -> int:
    """Pairs the SDPA mask lets through, less the padding tokens' own (which see themselves only)."""
    return int(attention_mask(batch, "sdpa", torch.float32).sum() - (batch["seq_ids"] == 0).sum())


def test_attended_pairs_are_those_the_mask_allows():
    packed = collate_rows([[([1, 2, 3], [2, 3, -100]), ([4, 5], [5, -100])], [([6], [-100])]], pad_id=0,
                          pad_to_multiple=8)
    assert attended_pairs(packed) == 6 + 3 + 1 == _allowed(packed)
    pairs = [_pair(4, 3, 5), _pair(2, 1, 2), _pair(6, 4, 1)]
    for rows in (None, [2, 1], [3]):
        batch = collate_pairs(pairs, 0, shared=True, rows=rows)
        assert attended_pairs(batch) == _allowed(batch)
    # by hand, pair 1 alone: a 1-token shared prompt (the prompt less its last token, which each
    # branch repeats) sees itself; the chosen branch's 2 tokens see it and 1, 2 of their own; the
    # rejected branch's 3 tokens see it and 1, 2, 3 of their own
    assert attended_pairs(collate_pairs(pairs[1:2], 0, shared=True)) == 1 + (2 + 3) + (2 + 3 + 4)


def test_matmul_params_leave_out_an_untied_input_embedding(tiny_model):
    model = load_model(ModelConfig(path=str(tiny_model)))
    every = sum(p.numel() for p in model.parameters())
    assert not model.config.tie_word_embeddings
    assert matmul_params(model) == every - model.get_input_embeddings().weight.numel()
    model.lm_head.weight = model.get_input_embeddings().weight  # tied: the one matrix is the head's product
    assert matmul_params(model) == sum(p.numel() for p in model.parameters())


def test_the_logged_mfu_is_the_steps_flops_over_the_peak(tiny_model, sandbox_data, tmp_path):
    run_sft(_cfg(tiny_model, sandbox_data, tmp_path, "train.max_steps=3", "train.log_every=1",
                 "train.peak_tflops=0.001"))
    plan = json.loads((tmp_path / "train_plan.json").read_text())
    assert plan["peak_tflops_per_device"] == 0.001
    config = load_model(ModelConfig(path=str(tiny_model))).config
    for r in _records(tmp_path):  # (a peak this low: MFUs above 1) 6N a token, plus attention: at most 12 x layers x hidden x tokens of context
        low = 6 * plan["matmul_params"] * r["tokens_per_s"] / 1e9
        high = low + 12 * config.num_hidden_layers * config.hidden_size * 128 * r["tokens_per_s"] / 1e9
        assert low < r["mfu"] <= high * 1.01
