"""Pairwise preference model: label tokens, prompt layout, truncation, order averaging."""

import json

import pytest
import torch

from rlhf_workflow.data.readers import read_pairs
from rlhf_workflow.errors import UserError
from rlhf_workflow.reward.pm import (
    build_comparisons,
    compare,
    encode_comparison,
    label_token_ids,
    load_preference_model,
    pm_messages,
    run_pm_train,
)

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def test_label_tokens_are_single_and_distinct(tokenizer):
    a, b = label_token_ids(tokenizer)
    assert a != b and tokenizer.decode([a]) == "A" and tokenizer.decode([b]) == "B"


class _Tok:
    name_or_path = "stub"

    def __init__(self, table):
        self.table = table

    def encode(self, text, add_special_tokens=False):
        return self.table[text]


@pytest.mark.parametrize("table", [{"A": [5, 6], "B": [7]}, {"A": [5], "B": [5]}])
def test_label_tokens_that_are_not_single_distinct_tokens_fail(table):
    with pytest.raises(UserError, match="'A' and 'B' must be single, distinct tokens"):
        label_token_ids(_Tok(table))


def test_template_that_changes_the_label_token_fails():
    from rlhf_workflow.models.tiny import train_tokenizer
    from rlhf_workflow.sandbox import corpus

    tok = train_tokenizer(corpus()[:800], vocab_size=400)
    tok.chat_template = tok.chat_template.replace(
        "'\n' + message['content']", "'\n ' + message['content']"
    )
    with pytest.raises(UserError, match="does not render the answer 'A'"):
        label_token_ids(tok)


def test_prompt_layout_and_answer_position(tokenizer):
    msgs = pm_messages(PROMPT, "Answer: 5", "Answer: 6")
    assert msgs == [
        {
            "role": "user",
            "content": "[CONTEXT] What is 2 + 3? [RESPONSE A] Answer: 5 [RESPONSE B] Answer: 6",
        }
    ]
    ids, cut = encode_comparison(tokenizer, PROMPT, "Answer: 5", "Answer: 6", 512)
    a, _ = label_token_ids(tokenizer)
    full = tokenizer(
        tokenizer.apply_chat_template(
            msgs + [{"role": "assistant", "content": "A"}], tokenize=False
        ),
        add_special_tokens=False,
    )["input_ids"]
    assert not cut and full[: len(ids) + 1] == ids + [a]  # the label is the next token


def test_long_comparison_cuts_context_first_and_keeps_response_ends(tokenizer):
    prompt = [{"role": "user", "content": "Sort: 3 1 2. " * 50}]
    a = "Let me think about it. " * 20 + "Answer: 1 2 3"
    b = "Here is my reasoning. " * 20 + "Answer: 1 3 2"
    ids, cut = encode_comparison(tokenizer, prompt, a, b, 160)
    assert cut and len(ids) <= 159
    text = tokenizer.decode(ids)
    assert "Answer: 1 2 3 [RESPONSE B]" in text and text.rstrip().endswith(
        tokenizer.decode(
            encode_comparison(tokenizer, PROMPT, "x", "Answer: 1 3 2", 512)[0][-6:]
        ).rstrip()
    )
    ids, cut = encode_comparison(tokenizer, prompt, "Answer: 5", "Answer: 6", 160)
    assert cut and "[RESPONSE A] Answer: 5 [RESPONSE B] Answer: 6" in tokenizer.decode(ids)


def test_chosen_position_is_random_but_seeded(tiny_model, small_prefs, pm_cfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows, _ = read_pairs(str(small_prefs[0]))
    d = pm_cfg("unused").data
    ids = label_token_ids(tok)
    _, labels, _, _ = build_comparisons(tok, rows, d, 0, ids)
    _, again, _, _ = build_comparisons(tok, rows, d, 0, ids)
    _, other, _, _ = build_comparisons(tok, rows, d, 1, ids)
    assert labels == again and labels != other
    assert 0.3 < labels.count(ids[0]) / len(labels) < 0.7


class _AlwaysA(torch.nn.Module):
    """Wraps a causal LM and adds +100 to the logit of ``A``: it says A whatever it reads."""

    def __init__(self, model, a_id):
        super().__init__()
        self.model, self.a_id = model, a_id

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits[..., self.a_id] += 100.0
        return out


def test_order_averaging_removes_a_planted_position_bias(trained_pm):
    model, tok = load_preference_model(trained_pm)
    items = [
        (PROMPT, "Answer: 5", "Answer: 6"),
        (PROMPT, "Let me think about it. Answer: 5", "Answer: 5"),
        ([{"role": "user", "content": "Sort: 3 1 2"}], "Answer: 1 2 3", "Answer: 2 1 3"),
    ]
    biased = _AlwaysA(model, label_token_ids(tok)[0])
    assert compare(biased, tok, items).probs == [0.5, 0.5, 0.5]
    p = compare(model, tok, items).probs
    q = compare(model, tok, [(pr, b, a) for pr, a, b in items]).probs
    assert [x + y for x, y in zip(p, q, strict=True)] == pytest.approx(
        [1.0] * 3, abs=1e-6
    )  # antisymmetric
    assert all(0 < x < 1 for x in p) and any(x != 0.5 for x in p)


def test_pm_training_learns_and_reports_held_out_accuracy(trained_pm):
    result = json.loads((trained_pm.parent / "eval.json").read_text())
    assert result["train_pairs"] == 400 and result["held_out_pairs"] == 100
    assert result["accuracy"] > 0.55 and {"accuracy/chat", "accuracy/reasoning"} <= set(result)
    assert 0.3 < result["p_first"] < 0.7


def test_pm_training_fails_early_on_bad_labels(tmp_path, pm_cfg, monkeypatch):
    import rlhf_workflow.reward.pm as pm

    monkeypatch.setattr(pm, "LABELS", ("A A", "B"))
    with pytest.raises(UserError, match="must be single, distinct tokens"):
        run_pm_train(pm_cfg(tmp_path / "pm"))
