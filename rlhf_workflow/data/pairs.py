"""Tokenized preference pairs: prompt + response with truncation rules, and their batches.

A response is tokenized as the last assistant turn of ``prompt + response`` (its loss mask
marks the response tokens, end-of-turn included). For training, truncation never destroys
the signal: a response is never cut. The prompt is cut from the left, to ``max_prompt_length``
tokens at most and further if a response needs the room, by the same amount for both
responses of a pair (so they keep sharing it); a pair whose longer response does not fit in
``max_length`` with at least one prompt token is reported as too long (``None``), for the
stage to count and skip or refuse. Scoring a single response (:func:`tokenize_response`)
cuts the response's start as a last resort (``keep="end"``: a reward head reads the end).
Texts are cut by characters before tokenizing (a pathological record of megabytes costs
no more than a long one).

Two batch layouts: 2N rows (the N chosen sequences, then the N rejected ones), or the
*shared-prompt* layout: one row per pair holding the prompt once, then the chosen response,
then the rejected one, each response with the positions it has in its own sequence and a
mask that hides the chosen response from the rejected one. Both compute the same numbers;
the shared layout runs the prompt through the model once instead of twice and pads less.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .batching import collate_rows
from .chat import Tokenized, tokenize_conversation
from .records import PreferencePair


@dataclass(frozen=True)
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized
    truncated: bool

    def __len__(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)

    @cached_property
    def shared_prefix(self) -> int:
        """Leading tokens the shared-prompt layout holds once: the common prompt prefix less
        its last token, whose logits predict each response's first token (each branch
        starts with it)."""
        c, r = self.chosen, self.rejected
        limit = min(_response_start(c), _response_start(r))
        n = 0
        while n < limit and c.input_ids[n] == r.input_ids[n]:
            n += 1
        return max(n - 1, 0)

    def shared_len(self) -> int:
        """Tokens of this pair's row in the shared-prompt layout."""
        return len(self) - self.shared_prefix


def _response_start(tok: Tokenized) -> int:
    return tok.loss_mask.index(True) if True in tok.loss_mask else len(tok.input_ids)


CHARS_PER_TOKEN = 64  # no tokenizer's token is longer: texts are cut to max_length x this first


def tokenize_response(tokenizer, prompt: list[dict], response: list[dict], max_length: int,
                      max_prompt_length: int | None = None, keep: str = "end") -> tuple[Tokenized, bool]:
    """(tokenized prompt + response with the response masked, whether it was truncated), for
    scoring: the prompt is cut first; if the response alone is still too long, its start
    (``keep="end"``) or its end (``keep="start"``) is cut too."""
    tok = tokenize_conversation(tokenizer, _cut_chars(prompt + response, max_length), train_on="last")
    ids, mask = tok.input_ids, tok.loss_mask
    if len(ids) <= max_length:
        return tok, False
    start = mask.index(True)
    p_ids, r_ids, r_mask = ids[:start], ids[start:], mask[start:]
    keep_prompt = max(0, max_length - len(r_ids))
    if max_prompt_length is not None:
        keep_prompt = max(keep_prompt, min(max_prompt_length, max_length - 1))
    keep_prompt = min(keep_prompt, len(p_ids), max_length - 1)
    room = max_length - keep_prompt
    if len(r_ids) > room:
        sl = slice(0, room) if keep == "start" else slice(len(r_ids) - room, len(r_ids))
        r_ids, r_mask = r_ids[sl], r_mask[sl]
    p_ids = p_ids[len(p_ids) - keep_prompt :]
    return Tokenized(p_ids + r_ids, [False] * len(p_ids) + r_mask), True


def tokenize_pair(tokenizer, pair: PreferencePair, max_length: int,
                  max_prompt_length: int | None = None) -> TokenizedPair | None:
    """Both responses whole, the prompt cut from the left by the same amount (see the module
    docstring); None when the longer response cannot fit."""
    prompt, chosen, rejected = pair.conversations()
    if any(len(m["content"]) > max_length * CHARS_PER_TOKEN for m in chosen + rejected):
        return None
    prompt = _cut_chars(prompt, max_length)
    c, r = (tokenize_conversation(tokenizer, prompt + resp, train_on="last") for resp in (chosen, rejected))
    starts = [t.loss_mask.index(True) for t in (c, r)]
    longest = max(len(t.input_ids) - s for t, s in zip((c, r), starts, strict=True))
    keep = min(*starts, max_length - longest, max_prompt_length or max(starts))
    if keep < 1:
        return None
    c, r = (_cut_prompt(t, s, keep) for t, s in zip((c, r), starts, strict=True))
    return TokenizedPair(c, r, keep < max(starts))


def _cut_prompt(tok: Tokenized, start: int, keep: int) -> Tokenized:
    """Keep the last ``keep`` of the ``start`` prompt tokens."""
    return Tokenized(tok.input_ids[start - keep :], tok.loss_mask[start - keep :])


def _cut_chars(messages: list[dict], max_length: int) -> list[dict]:
    """Messages whose texts keep at most their last ``max_length x CHARS_PER_TOKEN`` characters."""
    limit = max_length * CHARS_PER_TOKEN
    return [m if len(m["content"]) <= limit else {**m, "content": m["content"][-limit:]} for m in messages]


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, shared: bool = False,
                  rows: list[int] | None = None) -> dict:
    """A batch of N pairs: 2N rows (chosen first), or with ``shared`` the shared-prompt layout,
    ``rows[r]`` consecutive pairs packed into row r (one pair a row by default), with
    ``branch`` (0 prompt, 1 chosen, 2 rejected), ``ends``, (N, 2), the last position of each
    response and ``pair_row``, (N,), its row (where a reward head reads), and ``slot``: the
    response each token's target belongs to (n or N + n for pair n's chosen or rejected, 2N
    for the prompt and padding)."""
    n_pairs = len(pairs)
    if not shared:
        seqs = [(p.chosen.input_ids, p.chosen.targets()) for p in pairs]
        seqs += [(p.rejected.input_ids, p.rejected.targets()) for p in pairs]
        batch = collate_rows([[s] for s in seqs], pad_id)
    else:
        rows = rows or [1] * n_pairs
        firsts = [sum(rows[:r]) for r in range(len(rows))]
        k = [p.shared_prefix for p in pairs]
        segments = [(p.chosen.input_ids + p.rejected.input_ids[s:], p.chosen.targets() + p.rejected.targets()[s:])
                    for p, s in zip(pairs, k, strict=True)]
        batch = collate_rows([segments[f : f + m] for f, m in zip(firsts, rows, strict=True)], pad_id)
        branch, slot = torch.zeros_like(batch["seq_ids"]), torch.full_like(batch["seq_ids"], 2 * n_pairs)
        ends, pair_row = [], []
        for r, (f, m) in enumerate(zip(firsts, rows, strict=True)):
            t = 0  # where pair i starts in row r
            for i in range(f, f + m):
                p, s = pairs[i], k[i]
                c, n = len(p.chosen.input_ids), len(p.rejected.input_ids) - s
                branch[r, t + s : t + c], branch[r, t + c : t + c + n] = 1, 2
                slot[r, t + s : t + c], slot[r, t + c : t + c + n] = i, n_pairs + i
                batch["position_ids"][r, t + c : t + c + n] = torch.arange(s, s + n)
                ends.append([t + c - 1, t + c + n - 1])
                pair_row.append(r)
                t += c + n
        batch.update(branch=branch, slot=slot, ends=torch.tensor(ends), pair_row=torch.tensor(pair_row),
                     packed=True)
    batch["num_items"] = n_pairs
    batch["num_tokens"] = int((batch["seq_ids"] > 0).sum())
    return batch


def per_response(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sums of token values (B, T') over the last T' columns of ``batch``, per response, the N
    chosen first: (2N,) for N pairs in either layout (one response a row: the rows' sums)."""
    slot = batch.get("slot")
    if slot is None:
        return values.sum(-1)
    slot = slot[:, slot.shape[1] - values.shape[1] :]
    n = batch["num_items"]
    return values.new_zeros(2 * n + 1).scatter_add(0, slot.flatten(), values.flatten())[: 2 * n]
