"""Tokenized preference pairs: prompt + response with truncation rules, and their batches.

A response is tokenized as the last assistant turn of ``prompt + response`` (its loss mask
marks the response tokens, end-of-turn included). When the whole is too long, the prompt is
cut from the left first (down to ``max_prompt_length`` or what is needed); only if the
response alone still does not fit is the response cut: from the right for a policy
(``keep="start"``, DPO) or from the left for a reward model (``keep="end"``: the score head
reads the last token, so the end of the answer must stay visible). A response is never cut
away entirely.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def tokenize_response(tokenizer, prompt: list[dict], response: list[dict], max_length: int,
                      max_prompt_length: int | None = None, keep: str = "start") -> tuple[Tokenized, bool]:
    """(tokenized prompt + response with the response masked, whether it was truncated)."""
    tok = tokenize_conversation(tokenizer, prompt + response, train_on="last")
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
                  max_prompt_length: int | None = None, keep: str = "start") -> TokenizedPair:
    prompt, chosen, rejected = pair.conversations()
    c, tc = tokenize_response(tokenizer, prompt, chosen, max_length, max_prompt_length, keep)
    r, tr = tokenize_response(tokenizer, prompt, rejected, max_length, max_prompt_length, keep)
    return TokenizedPair(c, r, tc or tr)


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> dict:
    """One batch of 2N rows: the N chosen sequences first, then the N rejected ones."""
    rows = [[(p.chosen.input_ids, p.chosen.targets())] for p in pairs]
    rows += [[(p.rejected.input_ids, p.rejected.targets())] for p in pairs]
    batch = collate_rows(rows, pad_id)
    batch["num_items"] = len(pairs)
    batch["num_tokens"] = int((batch["seq_ids"] > 0).sum())
    return batch


def last_token_index(seq_ids: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (right padding): where a score head reads."""
    return (seq_ids > 0).long().sum(-1) - 1
