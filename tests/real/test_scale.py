"""The scale machinery on the pretrained model: the chunked log-prob primitive equals the
full-vocabulary computation at its 49,152-token vocabulary, and FSDP2 on 2 real ranks trains it
as one process does (tied embeddings, sharded per decoder layer), its export a plain HF folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rlhf_workflow.config import ModelConfig
from rlhf_workflow.data.chat import IGNORE, tokenize_conversation
from rlhf_workflow.models import logprobs
from rlhf_workflow.models.loading import load_model, load_tokenizer

pytestmark = pytest.mark.real


def test_the_log_prob_primitive_equals_the_full_vocabulary_one(real_model, monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * 49152 * 8)  # 8 positions a chunk: many chunks
    spec = ModelConfig(path=str(real_model))
    model, tok = load_model(spec), load_tokenizer(spec)
    assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
    convs = [[{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "Answer: 42"}],
             [{"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "Answer: 1 2 3, sorted."}]]
    toks = [tokenize_conversation(tok, c) for c in convs]
    width = max(len(t.input_ids) for t in toks)
    ids = torch.full((2, width), tok.pad_token_id)
    targets = torch.full((2, width), IGNORE)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, t in enumerate(toks):
        n = len(t.input_ids)
        ids[i, :n], targets[i, :n], mask[i, :n] = torch.tensor(t.input_ids), torch.tensor(t.targets()), 1
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(0))

    fast = logprobs.target_logps(model, inputs, targets)
    (fast * weights).sum().backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters() if "norm" in n or "embed" in n}
    model.zero_grad()
    logits = model(**inputs).logits.float()
    slow = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != IGNORE)
    (slow * weights).sum().backward()
    torch.testing.assert_close(fast, slow, atol=2e-4, rtol=1e-4)
    assert int((targets != IGNORE).sum()) > 8  # more than one chunk
    for n, g in g_fast.items():  # the tied embedding/head and every norm, to fp32 round-off over 30 layers
        naive = dict(model.named_parameters())[n].grad
        assert (g - naive).norm() <= 1e-3 * naive.norm(), n  # measured: 3e-5 (embedding) to 5e-4


def test_fsdp_on_two_ranks_trains_the_real_model_as_one_process(real_model, data, tier, tmp_path):
    args = [f"model.path={real_model}", f"data.train={data / 'sft.jsonl'}", "data.max_length=96",
            "data.packing=false", "optim.lr=1e-4", "optim.warmup_ratio=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    tier.run("sft", *args, *tier.train_args(one, 4, 2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rlhf_workflow.cli", "sft", *args, *tier.train_args(two, 4, 2), "train.strategy=fsdp"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((two / "train_plan.json").read_text())
    assert (plan["processes"], plan["strategy"], plan["micro_batch_size"]) == (2, "fsdp", 2)
    assert [m["loss"] for m in tier.metrics(two)] == pytest.approx([m["loss"] for m in tier.metrics(one)], rel=1e-4)
    wa, wb = (load_file(d / "model" / "model.safetensors") for d in (one, two))
    assert wa.keys() == wb.keys()
    start = load_file(real_model / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=1e-4)
    assert any(not torch.equal(wa[k], start[k]) for k in wa)  # both trained, the same way
    tier.assert_plain_reload(two / "model", real_model)
