"""Tokenized pairs in the shared-prompt layout: one row per pair, prompt once."""

import torch

from rlhf_workflow.data.chat import IGNORE
from rlhf_workflow.data.pairs import collate_pairs, per_response, tokenize_pair
from rlhf_workflow.data.records import PreferencePair
from rlhf_workflow.models.attention import attention_mask


def _pair(tokenizer, chosen, rejected, max_length=256, prompt="What is 12 + 30?", max_prompt_length=None):
    return tokenize_pair(tokenizer, PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected),
                         max_length, max_prompt_length)


def _response(tok):
    start = tok.loss_mask.index(True)
    return tok.input_ids[start:], tok.input_ids[:start]


def test_shared_row_holds_the_prompt_once_then_both_responses(tokenizer):
    long = _pair(tokenizer, "Answer: 42, since 12 + 30 = 42.", "Answer: 41")
    short = _pair(tokenizer, "42", "I do not know.")
    b = collate_pairs([long, short], tokenizer.pad_token_id, shared=True)
    assert b["input_ids"].shape[0] == 2 and b["num_items"] == 2
    for i, p in enumerate((long, short)):
        c, r = p.chosen, p.rejected
        start = c.loss_mask.index(True)
        k = p.shared_prefix
        # shared: the prompt less its last token, even though both responses begin "Answer: "
        assert k == start - 1 == r.loss_mask.index(True) - 1
        n = p.shared_len()
        assert n == len(c.input_ids) + len(r.input_ids) - k
        assert b["input_ids"][i, :n].tolist() == c.input_ids + r.input_ids[k:]
        assert b["branch"][i, :n].tolist() == [0] * k + [1] * (len(c.input_ids) - k) + [2] * (len(r.input_ids) - k)
        assert b["position_ids"][i, :n].tolist() == list(range(len(c.input_ids))) + list(range(k, len(r.input_ids)))
        assert b["targets"][i, :n].tolist() == c.targets() + r.targets()[k:]
        assert (b["targets"][i, :k] == IGNORE).all()
        assert b["ends"][i].tolist() == [len(c.input_ids) - 1, n - 1]
        assert (b["seq_ids"][i, n:] == 0).all() and (b["seq_ids"][i, :n] == 1).all()
    assert b["num_tokens"] == long.shared_len() + short.shared_len()


def test_a_tight_max_length_cuts_the_prompt_alike_for_both_responses_never_a_response(tokenizer):
    args = ("x " * 40, "y")
    prompt = "a b c d e f g h i j k l m n o p q r s t u v w x y z"
    full = _pair(tokenizer, *args, max_length=10_000, prompt=prompt)
    (long_resp, full_prompt), (short_resp, _) = _response(full.chosen), _response(full.rejected)
    assert not full.truncated and len(long_resp) > len(short_resp)
    limit = len(long_resp) + 5  # room for the last 5 prompt tokens
    p = _pair(tokenizer, *args, max_length=limit, prompt=prompt)
    (c_resp, c_prompt), (r_resp, r_prompt) = _response(p.chosen), _response(p.rejected)
    assert p.truncated and (c_resp, r_resp) == (long_resp, short_resp)  # whole responses
    assert c_prompt == r_prompt == full_prompt[-5:]  # the same cut, from the left
    assert len(p.chosen.input_ids) == limit and p.shared_prefix == 4
    b = collate_pairs([p], tokenizer.pad_token_id, shared=True)
    assert b["input_ids"][0, : p.shared_len()].tolist() == p.chosen.input_ids + p.rejected.input_ids[4:]
    # max_prompt_length caps the prompt even when the pair would fit
    capped = _pair(tokenizer, *args, max_length=10_000, prompt=prompt, max_prompt_length=3)
    assert _response(capped.chosen) == (long_resp, full_prompt[-3:]) and capped.truncated
    # a response that leaves no room for a prompt token: the pair does not fit, nothing is cut
    assert _pair(tokenizer, *args, max_length=len(long_resp), prompt=prompt) is None
    # a pathological record is cut by characters before it is tokenized
    huge = _pair(tokenizer, "a", "b", max_length=64, prompt="z " * 1_000_000)
    assert huge.truncated and len(huge.chosen.input_ids) <= 64
    assert _pair(tokenizer, "w " * 1_000_000, "b", max_length=64) is None


def test_branch_mask_hides_the_chosen_response_from_the_rejected_one(tokenizer):
    p = _pair(tokenizer, "Answer: 42", "Answer: 7")
    b = collate_pairs([p], tokenizer.pad_token_id, shared=True)
    sees = attention_mask(b, "sdpa", torch.float32)[0, 0]
    branch = b["branch"][0]
    k, c = p.shared_prefix, len(p.chosen.input_ids)
    rejected, chosen = (branch == 2).nonzero()[:, 0], (branch == 1).nonzero()[:, 0]
    for q in rejected:  # the rejected response sees the prompt and its own past only
        assert sees[q, :k].all() and not sees[q, k:c].any()
        assert sees[q, c : q + 1].all() and not sees[q, q + 1 :].any()
    for q in chosen:  # the chosen response: the prompt and its own past (plain causal)
        assert sees[q, : q + 1].all() and not sees[q, q + 1 :].any()


def test_per_response_sums_rows_or_slots():
    values = torch.arange(12.0).reshape(2, 6)
    assert per_response(values, {}).tolist() == [15.0, 51.0]
    # two pairs in row 0 (pair 0: columns 0-3, pair 1: 4-5), pair 2 in row 1; slot 6 = nobody's
    slot = torch.tensor([[0, 0, 3, 3, 1, 4], [6, 2, 5, 5, 6, 6]])
    assert per_response(values, {"slot": slot, "num_items": 3}).tolist() == [1.0, 4.0, 7.0, 5.0, 5.0, 17.0]
    # values of the last columns only (logits kept from the first response position on)
    assert per_response(values[:, 2:], {"slot": slot, "num_items": 3}).tolist() == [0.0, 4.0, 0.0, 5.0, 5.0, 17.0]


def test_pairs_packed_into_one_row_compute_what_each_computes_alone(tokenizer):
    """Three pairs in one row: each its own sequence ids, positions, branches, response slots and
    ends, equal to the pair's own row in the one-pair-a-row layout."""
    pairs = [_pair(tokenizer, "Answer: 42, since 12 + 30 = 42.", "Answer: 41"),
             _pair(tokenizer, "42", "I do not know."), _pair(tokenizer, "yes", "no", prompt="Is it?")]
    alone = collate_pairs(pairs, tokenizer.pad_token_id, shared=True)
    packed = collate_pairs(pairs, tokenizer.pad_token_id, shared=True, rows=[3])
    assert packed["input_ids"].shape[0] == 1 and packed["pair_row"].tolist() == [0, 0, 0]
    t = 0
    for i, p in enumerate(pairs):
        n = p.shared_len()
        for key in ("input_ids", "targets", "position_ids", "branch"):
            assert packed[key][0, t : t + n].tolist() == alone[key][i, :n].tolist(), key
        assert (packed["seq_ids"][0, t : t + n] == i + 1).all()
        assert packed["ends"][i].tolist() == (alone["ends"][i] + t).tolist()
        assert packed["slot"][0, t : t + n].tolist() == alone["slot"][i, :n].tolist()
        t += n
    values = torch.randn(packed["targets"].shape)
    seq, branch = packed["seq_ids"][0], packed["branch"][0]
    by_hand = [values[0][(seq == i + 1) & (branch == b)].sum() for b in (1, 2) for i in range(3)]
    torch.testing.assert_close(per_response(values, packed), torch.stack(by_hand))

def test_the_block_mask_lets_through_what_the_dense_mask_does(tokenizer):
    """FlexAttention's block mask (packed pairs, branches, padding) follows the same rule as the
    SDPA mask, position by position (its kernel needs a GPU to train; the rule is checked here)."""
    from torch.nn.attention.flex_attention import create_mask

    pairs = [_pair(tokenizer, "Answer: 42, since 12 + 30 = 42.", "Answer: 41"),
             _pair(tokenizer, "42", "I do not know."), _pair(tokenizer, "yes", "no", prompt="Is it?")]
    for rows in ([3], [1, 2]):
        b = collate_pairs(pairs, tokenizer.pad_token_id, shared=True, rows=rows)
        block = attention_mask(b, "flex_attention", torch.float32)
        t = b["seq_ids"].shape[1]
        dense = create_mask(block.mask_mod, len(b["seq_ids"]), 1, t, t, device="cpu")
        assert torch.equal(dense, attention_mask(b, "sdpa", torch.float32))
