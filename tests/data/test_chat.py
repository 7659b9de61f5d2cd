import pytest

from rlhf_workflow.data.chat import IGNORE, encode_prompt, tokenize_conversation
from rlhf_workflow.errors import UserError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3 + 5?"},
    {"role": "assistant", "content": "Answer: 8"},
    {"role": "user", "content": "Sort: 3 9 1"},
    {"role": "assistant", "content": "Let me think. Answer: 1 3 9"},
]
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def _masked_text(tok, tokenized):
    return tok.decode([i for i, m in zip(tokenized.input_ids, tokenized.loss_mask, strict=False) if m])


def test_mask_covers_exactly_assistant_content_and_end_of_turn(tokenizer):
    style = "llama3" if "<|eot_id|>" in tokenizer.get_vocab() else "chatml"
    t = tokenize_conversation(tokenizer, CONV)
    eot = EOT[style]
    assert _masked_text(tokenizer, t) == f"Answer: 8{eot}Let me think. Answer: 1 3 9{eot}"
    # the ids are exactly the template's rendering (single BOS for llama3, none for chatml)
    rendered = tokenizer.apply_chat_template(CONV, tokenize=False)
    assert t.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    last = tokenize_conversation(tokenizer, CONV, train_on="last")
    assert _masked_text(tokenizer, last) == f"Let me think. Answer: 1 3 9{eot}"


def test_targets_are_shifted_within_the_sequence(tokenizer):
    t = tokenize_conversation(tokenizer, CONV[1:3])
    targets = t.targets()
    assert len(targets) == len(t.input_ids) and targets[-1] == IGNORE
    for pos, tgt in enumerate(targets[:-1]):
        assert tgt == (t.input_ids[pos + 1] if t.loss_mask[pos + 1] else IGNORE)


def test_prompt_encoding_is_the_conversation_prefix(tokenizer):
    prompt = encode_prompt(tokenizer, CONV[:2])
    full = tokenize_conversation(tokenizer, CONV[:3])
    assert full.input_ids[: len(prompt)] == prompt
    assert not any(full.loss_mask[: len(prompt)])
    masked = [i for i, m in enumerate(full.loss_mask) if m]
    assert masked == list(range(len(prompt), len(prompt) + len(masked)))  # one block after it


def test_template_that_rewrites_history_is_rejected(tokenizer):
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    # renders only the last message: earlier turns vanish from the full text
    tok.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(UserError, match="not prefix-stable"):
        tokenize_conversation(tok, CONV)
