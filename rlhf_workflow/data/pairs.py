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


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, shared: bool = False) -> dict:
    """A batch of N pairs: 2N rows (chosen first), or with ``shared`` N rows in the
    shared-prompt layout, with ``branch`` (0 prompt, 1 chosen, 2 rejected) and ``ends``,
    (N, 2), the last position of each response (where a reward head reads)."""
    if not shared:
        rows = [[(p.chosen.input_ids, p.chosen.targets())] for p in pairs]
        rows += [[(p.rejected.input_ids, p.rejected.targets())] for p in pairs]
        batch = collate_rows(rows, pad_id)
    else:
        k = [p.shared_prefix for p in pairs]
        batch = collate_rows([[(p.chosen.input_ids + p.rejected.input_ids[s:],
                                p.chosen.targets() + p.rejected.targets()[s:])]
                              for p, s in zip(pairs, k, strict=True)], pad_id)
        branch, ends = torch.zeros_like(batch["seq_ids"]), []
        for i, (p, s) in enumerate(zip(pairs, k, strict=True)):
            c, r = len(p.chosen.input_ids), len(p.rejected.input_ids)
            branch[i, s:c], branch[i, c : c + r - s] = 1, 2
            batch["position_ids"][i, c : c + r - s] = torch.arange(s, r)
            ends.append([c - 1, c + r - s - 1])
        batch.update(branch=branch, ends=torch.tensor(ends), packed=torch.tensor(True))
    batch["num_items"] = len(pairs)
    batch["num_tokens"] = int((batch["seq_ids"] > 0).sum())
    return batch


def per_response(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sums of token values (B, T') over the last T' columns of ``batch``: per row, or in the
    shared-prompt layout per response, the N chosen first: (2N,) for N pairs either way."""
    branch = batch.get("branch")
    if branch is None:
        return values.sum(-1)
    branch = branch[:, branch.shape[1] - values.shape[1] :]
    return torch.cat([(values * (branch == b)).sum(-1) for b in (1, 2)])
