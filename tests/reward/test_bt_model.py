"""Bradley-Terry reward model: loss, pad token, truncation, scoring, encoders, bad input."""

import json
import math
import re

import pytest
import torch
from transformers import LlamaForSequenceClassification

from rlhf_workflow.data.pairs import collate_pairs
from rlhf_workflow.data.readers import read_pairs, read_records
from rlhf_workflow.data.records import PreferencePair
from rlhf_workflow.errors import UserError
from rlhf_workflow.losses import bt_loss
from rlhf_workflow.models.tiny import tiny_config, train_tokenizer
from rlhf_workflow.reward.bt import (
    bt_objective,
    bt_rewards,
    load_reward_model,
    run_rm_train,
    score,
    score_tokenized,
    shares_prompt,
)
from rlhf_workflow.reward.encoding import PAD_TOKEN, encode, encode_pair, ensure_pad_token
from rlhf_workflow.sandbox import corpus

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def test_bt_loss_hand_computed():
    """-log sigmoid(x) = log(1 + e^-x): x = 1 -> 0.313262, x = 0 -> log 2, x = -2 -> 2.126928;
    the margin m shifts x to x - m: x = 1, m = 0.5 -> log(1 + e^-0.5) = 0.474077."""
    loss = bt_loss(torch.tensor([2.0, 0.3, -1.0]), torch.tensor([1.0, 0.3, 1.0]))
    torch.testing.assert_close(loss, torch.tensor([0.3132617, math.log(2), 2.1269280]))
    torch.testing.assert_close(
        bt_loss(torch.tensor([2.0]), torch.tensor([1.0]), 0.5), torch.tensor([0.4740770])
    )


class FixedRewards(torch.nn.Module):
    """Returns given rewards, one per row, whatever the input."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values)
        self.config = type("C", (), {})()

    def forward(self, input_ids, attention_mask):
        return type("O", (), {"logits": self.values[:, None]})()


def test_objective_pairs_the_first_half_with_the_second_and_sums():
    """Rows are [chosen_1, chosen_2, rejected_1, rejected_2]; loss and metrics are sums."""
    model = FixedRewards([2.0, 0.0, 1.0, 0.0])
    batch = {
        "input_ids": torch.zeros(4, 3, dtype=torch.long),
        "seq_ids": torch.ones(4, 3),
        "num_items": 2,
        "margin": torch.tensor([0.5, 0.0]),
    }
    out = bt_objective(model, batch)
    torch.testing.assert_close(out.loss_sum, torch.tensor(0.4740770 + math.log(2)))
    assert out.metric_sums["accuracy"].item() == 1.0  # a win and a tie, which counts 0 (as RewardBench's)
    assert out.metric_sums["margin"].item() == 1.0


# --------------------------------------------------------------------------- pad token


def _tokenizer_without_pad(template):
    """Like the tiny tokenizer, but without a pad token in the vocabulary (as Llama-3's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf_workflow.models.tiny import TEMPLATES

    spec = TEMPLATES[template]
    specials = [t for t in spec["specials"] if t != spec["pad"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus()[:800],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        chat_template=spec["chat_template"],
    )


def _model_with_pad_eq_eos(template):
    tok = _tokenizer_without_pad(template)
    assert tok.pad_token is None and PAD_TOKEN not in tok.get_vocab()
    tok.pad_token = tok.eos_token  # the usual quick fix, and the pitfall
    config = tiny_config(tok, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64)
    config.num_labels = 1
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval(), tok


def _head_at(model, ids: list[int], pos: int) -> float:
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state
        return model.score(h[0, pos]).item()


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_pad_equal_to_eos_is_replaced_and_chosen_rejected_then_differ(template):
    model, tok = _model_with_pad_eq_eos(template)
    pair = PreferencePair(prompt="What is 2 + 3?", chosen="Answer: 5", rejected="Answer: 6")
    enc = encode_pair(tok, pair, 128)
    c, r = enc.chosen.input_ids, enc.rejected.input_ids
    # the pitfall: with pad == EOS, the classic "first pad token - 1" rule reads the last
    # token before the prompt's end-of-turn, i.e. a prompt token, for both responses
    first_pad = lambda ids: ids.index(tok.pad_token_id) - 1  # noqa: E731
    assert first_pad(c) == first_pad(r)
    assert _head_at(model, c, first_pad(c)) == _head_at(model, r, first_pad(r))

    vocab = len(tok)
    assert ensure_pad_token(model, tok)
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
    assert len(tok) == vocab + 1 == model.get_input_embeddings().num_embeddings
    assert model.config.pad_token_id == tok.pad_token_id

    rc, rr = score(model, tok, [PROMPT, PROMPT], ["Answer: 5", "Answer: 6"], progress=False)
    assert rc != rr
    # the score is the head at the sequence's last real token (the end of the response)
    enc = encode_pair(tok, pair, 128)
    assert rc == pytest.approx(_head_at(model, enc.chosen.input_ids, -1), abs=1e-5)


def test_existing_dedicated_pad_is_kept_and_a_known_pad_token_reused():
    model, _ = _model_with_pad_eq_eos("chatml")
    tok = train_tokenizer(corpus()[:800], vocab_size=400)  # has its own <|pad|>
    n, pad = len(tok), tok.pad_token_id
    assert not ensure_pad_token(model, tok)
    assert len(tok) == n and model.config.pad_token_id == pad != tok.eos_token_id
    tok.pad_token = tok.eos_token
    assert ensure_pad_token(model, tok)  # back to <|pad|>, already in the vocabulary
    assert len(tok) == n and tok.pad_token_id == model.config.pad_token_id == pad


# --------------------------------------------------------------------------- truncation


def test_truncation_keeps_the_end_of_the_response(tokenizer):
    long_prompt = [{"role": "user", "content": " ".join(["Sort: 3 1 2"] * 40)}]
    response = [{"role": "assistant", "content": "I will work it out. " * 30 + "Answer: 1 2 3"}]
    full, cut = encode(tokenizer, long_prompt, response, 4096)
    assert not cut
    tok, cut = encode(tokenizer, long_prompt, response, 64, max_prompt_length=16)
    assert cut and len(tok.input_ids) == 64
    # the sequence ends exactly as the untruncated one: response end + end of turn
    assert tok.input_ids[-20:] == full.input_ids[-20:]
    assert tok.loss_mask.index(True) == 16  # the prompt kept 16 tokens, the response the rest
    assert "Answer: 1 2 3" in tokenizer.decode(tok.input_ids)
    # a short response keeps all of it; only the prompt is cut from the left
    short = [{"role": "assistant", "content": "Answer: 1 2 3"}]
    tok, cut = encode(tokenizer, long_prompt, short, 64)
    full_short, _ = encode(tokenizer, long_prompt, short, 4096)
    assert cut and sum(tok.loss_mask) == sum(full_short.loss_mask)
    assert tok.input_ids == full_short.input_ids[-64:]


# --------------------------------------------------------------------------- training / scoring


def test_training_learns_the_preferences(trained_rm):
    result = json.loads((trained_rm.parent / "eval.json").read_text())
    assert result["train_pairs"] == 400 and result["held_out_pairs"] == 100
    assert result["accuracy"] > 0.55 and {"accuracy/chat", "accuracy/reasoning"} <= set(result)
    assert result["loss"] < math.log(2)  # better than the untrained "all rewards equal"


def test_score_restores_order_and_matches_unbatched(trained_rm):
    model, tok = load_reward_model(trained_rm)
    responses = [
        "Answer: 5",
        "Let me think about it. " * 6 + "Answer: 5",
        "Answer: 6",
        "I will work it out. Answer: 5",
        "That is a good question. " * 3 + "Answer: 4",
    ]
    prompts = [PROMPT] * len(responses)
    batched = score(model, tok, prompts, responses, batch_size=2, progress=False)
    naive = score(
        model, tok, prompts, responses, batch_size=2, progress=False, sort_by_length=False
    )
    alone = [
        score(model, tok, [p], [r], progress=False)[0]
        for p, r in zip(prompts, responses, strict=True)
    ]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert naive == pytest.approx(alone, abs=1e-5)
    assert len(set(round(x, 6) for x in batched)) == len(batched)


def test_shared_prompt_layout_gives_the_same_rewards_and_gradients(trained_rm, sandbox_data):
    model, tok = load_reward_model(trained_rm)
    assert shares_prompt(model, tok)
    rows, _ = read_pairs(str(sandbox_data / "prefs_test.jsonl"))
    pairs = [encode_pair(tok, r.pair, 128) for r in rows[:12]]
    assert any(p.shared_prefix > 10 for p in pairs)
    alone = score_tokenized(model, [p.chosen for p in pairs] + [p.rejected for p in pairs],
                            tok.pad_token_id)
    model.train()
    grads, outs = [], []
    for layout, rows in ((False, None), (True, None), (True, [5, 7])):  # (last: pairs packed into 2 rows)
        model.zero_grad()
        batch = collate_pairs(pairs, tok.pad_token_id, layout, rows)
        torch.testing.assert_close(bt_rewards(model, batch).tolist(), alone, atol=1e-5, rtol=1e-5)
        out = bt_objective(model, batch)
        out.loss_sum.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other, other_grads in zip(outs[1:], grads[1:], strict=True):
        torch.testing.assert_close(other.loss_sum, outs[0].loss_sum, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.metric_sums, outs[0].metric_sums, atol=1e-4, rtol=1e-5)
        for name in grads[0]:
            torch.testing.assert_close(other_grads[name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_bf16_scores_close_to_fp32(trained_rm):
    model, tok = load_reward_model(trained_rm)
    model16, _ = load_reward_model(trained_rm, dtype="bf16")
    assert model16.dtype == torch.bfloat16
    responses = ["Answer: 5", "Let me check carefully. Answer: 6"]
    a = score(model, tok, [PROMPT] * 2, responses, progress=False)
    b = score(model16, tok, [PROMPT] * 2, responses, progress=False)
    assert b == pytest.approx(a, abs=0.1)


# --------------------------------------------------------------------------- encoders


def test_encoder_backbone_reads_a_text_pair(bert_model, small_prefs, tmp_path, rm_cfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_model)
    t, cut = encode(tok, PROMPT, [{"role": "assistant", "content": "Answer: 5"}], 64)
    words = tok.convert_ids_to_tokens(t.input_ids)
    assert not cut and words[0] == "[CLS]" and words[-1] == "[SEP]" and words.count("[SEP]") == 2
    assert t.loss_mask.index(True) == words.index("[SEP]") + 1  # response = type-1 segment
    t, cut = encode(
        tok,
        PROMPT,
        [{"role": "assistant", "content": "I will work it out. " * 20 + "answer: 5"}],
        24,
        max_prompt_length=4,
    )
    assert cut and len(t.input_ids) == 24
    assert tok.convert_ids_to_tokens(t.input_ids)[-4:] == ["answer", ":", "5", "[SEP]"]

    cfg = rm_cfg(
        tmp_path / "rm",
        f"model.path={bert_model}",
        f"data.train={small_prefs[0]}",
        f"data.test={small_prefs[1]}",
        "train.max_steps=4",
    )
    path = run_rm_train(cfg)
    model, tok = load_reward_model(path)
    assert type(model).__name__ == "BertForSequenceClassification"
    r = score(model, tok, [PROMPT] * 2, ["answer: 5", "answer: 6"], progress=False)
    assert r[0] != r[1]
    result = json.loads((tmp_path / "rm" / "eval.json").read_text())
    held_out = read_records(small_prefs[1], PreferencePair)  # scored again, pair by pair, as text
    prompts = [[{"role": "user", "content": p.prompt}] for p in held_out]
    c = score(model, tok, prompts, [p.chosen for p in held_out], progress=False)
    r = score(model, tok, prompts, [p.rejected for p in held_out], progress=False)
    assert result["accuracy"] == pytest.approx(sum(a > b for a, b in zip(c, r, strict=True)) / len(held_out))


# --------------------------------------------------------------------------- bad input

BAD_LINES = [
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "field 'chosen': must not be empty or only whitespace"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "field 'rejected': must not be empty or only whitespace"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "field 'chosen': equal to rejected"),
    ({"prompt": "q", "chosen": "a"}, "field 'rejected': Field required"),
    ({"prompt": "q", "chosen": 5, "rejected": "b"}, "field 'chosen': Input should be a valid string"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt': must not be empty"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "field 'chosen': must end with a non-empty assistant message"),
]


@pytest.mark.parametrize("row,reason", BAD_LINES)
def test_bad_pair_is_an_error_naming_the_line(tmp_path, row, reason):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=re.escape(f"pairs.jsonl, line 2: {reason}")):
        read_pairs(str(path))
    rows, skipped = read_pairs(str(path), on_bad="skip")
    assert len(rows) == 1 and sum(skipped.values()) == 1


def test_bad_pairs_are_skipped_and_counted_in_training(small_prefs, tmp_path, rm_cfg):
    lines = small_prefs[0].read_text().splitlines()
    bad = [json.dumps(r) for r, _ in BAD_LINES]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines[:30] + bad + lines[30:]) + "\n")
    with pytest.raises(UserError, match="line 31: field 'chosen': must not be empty"):
        run_rm_train(rm_cfg(tmp_path / "a", f"data.train={path}", "train.max_steps=1"))
    run_rm_train(
        rm_cfg(
            tmp_path / "b",
            f"data.train={path}",
            f"data.test={small_prefs[1]}",
            "train.max_steps=1",
            "data.on_bad=skip",
        )
    )
    result = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert result["train_pairs"] == 64 and sum(result["skipped_invalid"].values()) == len(BAD_LINES)


def test_over_long_pairs_cut_the_prompt_or_are_skipped_or_fail(small_prefs, tmp_path, rm_cfg):
    common = [f"data.train={small_prefs[0]}", f"data.test={small_prefs[1]}", "train.max_steps=1",
              "data.max_length=24"]
    run_rm_train(rm_cfg(tmp_path / "s", *common))
    s = json.loads((tmp_path / "s" / "eval.json").read_text())
    assert s["truncated"] > 0 and s["skipped_long"] > 0  # prompts cut; pairs whose responses cannot fit
    assert s["train_pairs"] + s["held_out_pairs"] + s["skipped_long"] == 80
    with pytest.raises(UserError, match="line [0-9]+: a response does not fit in data.max_length=24"):
        run_rm_train(rm_cfg(tmp_path / "e", *common, "data.on_long=error"))
    with pytest.raises(UserError, match=r"max_prompt_length \(24\) must be smaller than max_length \(24\)"):
        rm_cfg(tmp_path / "x", *common, "data.max_prompt_length=24")


def test_margin_field_must_be_numeric(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "meta": {"m": 1.5}})
        + "\n"
        + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "m": "x"})
        + "\n"
    )
    with pytest.raises(UserError, match="line 2: field 'm': the margin must be a number"):
        read_pairs(str(path), margin_field="m")
    rows, _ = read_pairs(str(path), margin_field="m", on_bad="skip")
    assert rows[0].margin == 1.5


def test_collated_pairs_put_chosen_first(tokenizer):
    pairs = [
        encode_pair(tokenizer, PreferencePair(prompt="q", chosen=c, rejected=r), 64)
        for c, r in (("Answer: 1", "Answer: 22"), ("Answer: 333", "Answer: 4"))
    ]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["num_items"] == 2 and batch["input_ids"].shape[0] == 4
    row0 = batch["input_ids"][0][batch["seq_ids"][0] > 0].tolist()
    assert row0 == pairs[0].chosen.input_ids
