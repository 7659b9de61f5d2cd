"""DPO (full and LoRA) from the SFT model: the first loss is log 2 (policy == reference), the
logged log-probs are those plain transformers computes, and the saved models are plain HF
folders that prefer the chosen responses more than the SFT model does."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.real

N_PAIRS = 4


@pytest.fixture(scope="module")
def pairs(data, tmp_path_factory):
    lines = (data / "prefs_train.jsonl").read_text().split("\n")[:N_PAIRS]
    path = tmp_path_factory.mktemp("dpo-pairs") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def dpo(tier, sft_model, pairs, out, steps: int, *extra: str, batch: int = N_PAIRS):
    """``rlhf dpo``; by default every step sees all the pairs (one micro-batch)."""
    tier.run("dpo", f"model.path={sft_model}", f"data.train={pairs}", "data.max_length=128", "loss.beta=0.1",
             *tier.train_args(out, batch, steps), *extra)
    return tier.metrics(out)


@torch.no_grad()
def response_logps(model, tok, rows: list[dict], key: str) -> list[float]:
    """Summed log-probs of each row's response (its tokens and <|im_end|>) after the prompt,
    from the rendered text, one unpadded sequence at a time."""
    out = []
    for r in rows:
        user = [{"role": "user", "content": r["prompt"]}]
        prompt = tok(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True))["input_ids"]
        full = tok(tok.apply_chat_template(user + [{"role": "assistant", "content": r[key]}], tokenize=False))["input_ids"]
        assert full[: len(prompt)] == prompt and tok.convert_ids_to_tokens(full[-2:]) == ["<|im_end|>", "Ċ"]
        logits = model(input_ids=torch.tensor([full])).logits[0].float().log_softmax(-1)
        out.append(sum(logits[t - 1, full[t]].item() for t in range(len(prompt), len(full) - 1)))
    return out


@pytest.fixture(scope="module")
def reference(sft_model, pairs):
    """(rows, tokenizer, summed log-probs of the chosen and rejected responses under SFT)."""
    model, tok = AutoModelForCausalLM.from_pretrained(sft_model).eval(), AutoTokenizer.from_pretrained(sft_model)
    rows = [json.loads(x) for x in pairs.read_text().split("\n") if x]
    return rows, tok, {k: response_logps(model, tok, rows, k) for k in ("chosen", "rejected")}


def implied_margins(model, reference) -> list[float]:
    """(log pi(c) - log pi(r)) - (log ref(c) - log ref(r)) per pair."""
    rows, tok, ref = reference
    pc, pr = response_logps(model, tok, rows, "chosen"), response_logps(model, tok, rows, "rejected")
    return [(a - b) - (c - d) for a, b, c, d in zip(pc, pr, ref["chosen"], ref["rejected"], strict=True)]


def test_full_dpo(sft_model, reference, pairs, tier, tmp_path):
    m = dpo(tier, sft_model, pairs, tmp_path, 3, "optim.lr=1e-5", "optim.warmup_ratio=0")
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    for key in ("chosen", "rejected"):  # the policy's log-probs as logged = plain transformers on SFT
        assert m[0][f"logps/{key}"] == pytest.approx(sum(reference[2][key]) / N_PAIRS, abs=1e-3)
    model, _ = tier.assert_plain_reload(tmp_path / "model", sft_model)
    margins = implied_margins(model, reference)
    assert sum(margins) / N_PAIRS > 0.1, margins  # the saved model is the trained one


def test_lora_dpo_merged_model(sft_model, reference, pairs, tier, tmp_path):
    from peft import PeftModel

    m = dpo(tier, sft_model, pairs, tmp_path, 3, "lora.r=8", "lora.alpha=16", "optim.lr=2e-4",
            "optim.warmup_ratio=0")
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    merged, tok = tier.assert_plain_reload(tmp_path / "model", sft_model)
    base = AutoModelForCausalLM.from_pretrained(sft_model)
    rebuilt = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    seqs = tier.chat_inputs(tok)
    for a, b in zip(tier.logits_of(merged, seqs), tier.logits_of(rebuilt, seqs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    margins = implied_margins(merged, reference)
    assert sum(margins) / N_PAIRS > 0.1, margins


def test_bf16_dpo_starts_at_log_2(sft_model, pairs, tier, tmp_path):
    """Training computes in bf16 (autocast), where a log-prob depends on the batch it is padded
    into: the reference pass runs training's own first-epoch batches in bf16, so the first
    loss is log 2 to float32 round-off (margins exactly 0) although nothing is computed twice
    the same way by chance."""
    m = dpo(tier, sft_model, pairs, tmp_path, 1, "train.mixed_precision=bf16", batch=2)  # (bf16 is slow on CPU)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m[0]["rewards/margin"] == 0.0
