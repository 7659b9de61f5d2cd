"""The assistant mask under SmolLM2's own ChatML template, whose default system prompt is
inserted into every conversation that has none."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rlhf_workflow.data.chat import tokenize_conversation

pytestmark = pytest.mark.real

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def masked_text(tok, t) -> list[str]:
    """The masked tokens as strings, one string per contiguous span."""
    spans, cur = [], []
    for i, m in zip(t.input_ids, t.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    return [tok.convert_tokens_to_string(tok.convert_ids_to_tokens(s)) for s in spans]


def test_mask_is_the_assistant_content_and_end_of_turn(real_model):
    tok = AutoTokenizer.from_pretrained(real_model)
    conv = [{"role": "user", "content": "What is 3 + 5?"}, {"role": "assistant", "content": "Answer: 8"},
            {"role": "user", "content": "And 2 + 2?"}, {"role": "assistant", "content": "Let me see. Answer: 4"}]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")  # added, though not asked for
    t = tokenize_conversation(tok, conv)
    assert t.input_ids == tok(text, add_special_tokens=False)["input_ids"]  # the rendered text, tokenized once
    assert masked_text(tok, t) == ["Answer: 8<|im_end|>", "Let me see. Answer: 4<|im_end|>"]
    tokens = tok.convert_ids_to_tokens(t.input_ids)
    first = t.loss_mask.index(True)
    assert tok.convert_tokens_to_string(tokens[first - 4 : first]) == "<|im_start|>assistant\n"  # header unmasked
    assert tokens[-2:] == ["<|im_end|>", "Ċ"] and t.loss_mask[-2:] == [True, False]  # the newline after it too
    unmasked = tok.convert_tokens_to_string([x for x, m in zip(tokens, t.loss_mask, strict=True) if not m])
    assert DEFAULT_SYSTEM in unmasked  # the default system prompt carries no loss
    last_only = tokenize_conversation(tok, conv, train_on="last")
    assert masked_text(tok, last_only) == ["Let me see. Answer: 4<|im_end|>"]


def test_an_explicit_system_prompt_replaces_the_default(real_model):
    tok = AutoTokenizer.from_pretrained(real_model)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 3 1"},
            {"role": "assistant", "content": "Answer: 1 3"}]
    t = tokenize_conversation(tok, conv)
    assert DEFAULT_SYSTEM not in tok.decode(t.input_ids)
    assert masked_text(tok, t) == ["Answer: 1 3<|im_end|>"]
