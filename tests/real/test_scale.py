"""The scale machinery on the pretrained model: the chunked log-prob primitive equals the
full-vocabulary computation at its 49,152-token vocabulary, and FSDP2 on 2 real ranks trains it
as one process does (tied embeddings, sharded per decoder layer, each rank loading its share),
its export a plain HF folder; on 2 ranks each holds about half a model's memory at load, in the
reference pass and while a two-model judge scores (``benchmarks/rank_memory.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_workflow.cli import main
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


def test_each_rank_holds_its_share_at_load_in_the_reference_pass_and_judging(tmp_path):
    """A 152M-parameter Llama built from a config, saved in bf16 and loaded in fp32 as an 8B
    checkpoint is: on 2 ranks (FSDP2) each rank's private memory grows by at most ~60% of what
    one process's grows by while loading (FSDP2, and ZeRO-3 through deepspeed.zero.Init), while
    a frozen reference runs its pass and while the DPO implicit judge (two models) scores. What is left over the half is the gathered root
    (embeddings, final norm) and the decoder layer running (docs/scaling.md)."""
    from transformers import AutoModelForCausalLM

    model = tmp_path / "m150"
    assert main(["init-model", f"out={model}", "hidden_size=768", "num_layers=24", "num_heads=12",
                 "num_kv_heads=4", "intermediate_size=2048", "vocab_size=4096"]) == 0
    AutoModelForCausalLM.from_pretrained(model).to(torch.bfloat16).save_pretrained(model)
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "rank_memory.py"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed memory goes back to the system
    one, two, zero = tmp_path / "one.json", tmp_path / "two.json", tmp_path / "zero.json"
    ranks2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
              str(model)]
    for cmd in ([sys.executable, str(script), str(model), str(one)], [*ranks2, str(two)],
                [*ranks2, str(zero), "--strategy", "zero3"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    base = json.loads(one.read_text())
    ranks = [json.loads(two.read_text()), json.loads(two.with_name("two.rank1.json").read_text())]
    assert base["world"] == 1 and [r["world"] for r in ranks] == [2, 2] and base["params"] > 150e6
    assert base["load_mib"] > 0.9 * base["fp32_mib"]  # one process: the whole fp32 model
    for r in ranks:  # measured: 51% at load, 63% in the reference pass, 57% judging
        assert r["load_mib"] <= 0.6 * base["load_mib"], r
        assert r["reference_mib"] <= 0.66 * base["reference_mib"], r
        assert r["judge_mib"] <= 0.6 * base["judge_mib"], r
    for r in (json.loads(zero.read_text()), json.loads(zero.with_name("zero.rank1.json").read_text())):
        assert r["strategy"] == "zero3" and r["world"] == 2  # deepspeed.zero.Init: measured 56%
        assert r["load_mib"] <= 0.62 * base["load_mib"], r
