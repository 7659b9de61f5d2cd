"""How a judge reads text: reward-model tokenization, shared by training, scoring and evaluation.

- **Pad token.** Decoder score heads read the rightmost token that is not the pad token. If
  pad == EOS, the end-of-turn tokens count as padding, and with the older "first pad" rule
  the head reads a prompt token, so chosen and rejected score the same. :func:`ensure_pad_token`
  adds a dedicated pad token (and resizes the embeddings) when there is none or it equals EOS.
- **Chat template** when the tokenizer has one: the response is the last assistant turn of
  ``prompt + response``, rendered from the text with the judge's own template (never the
  policy's token ids). Training pairs keep both responses whole and cut the prompt
  (:func:`..data.pairs.tokenize_pair`); scoring one response cuts its start as a last resort
  (the head reads the end).
- **Encoders** (BERT-style, no chat template) read ``prompt`` and ``response`` as a text pair
  with the tokenizer's own special tokens (``[CLS] prompt [SEP] response [SEP]``, token types
  0/1); their head reads ``[CLS]``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import PairLimits
from ..data.chat import Tokenized
from ..data.pairs import TokenizedPair, tokenize_pair, tokenize_response
from ..data.readers import PairRow
from ..data.records import PreferencePair
from ..errors import UserError

PAD_TOKEN = "<|pad|>"


def ensure_pad_token(model, tokenizer) -> bool:
    """Give the tokenizer a pad token distinct from EOS (``<|pad|>``, added to the vocabulary
    if missing, the embeddings grown by zero rows: padding is never read), and set
    ``config.pad_token_id``. Returns whether the pad token changed. Works on a model on the
    meta device too (sharded loading fills the new rows with zeros)."""
    changed = tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id
    if changed:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        old = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > old:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                            if m is not None}.values():
                    emb.weight[old:].zero_()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return changed


def check_pad(model, tokenizer) -> None:
    """A reward model must carry the dedicated pad token its tokenizer has (see :func:`ensure_pad_token`)."""
    pad = model.config.get_text_config().pad_token_id
    if (
        pad is None
        or pad != tokenizer.pad_token_id
        or (uses_chat_template(tokenizer) and pad == tokenizer.eos_token_id)
    ):
        raise UserError(
            f"reward model {model.config.name_or_path!r} has no dedicated pad token "
            f"(config pad_token_id={pad}, tokenizer pad {tokenizer.pad_token_id}, "
            f"eos {tokenizer.eos_token_id}); "
            "models trained with `rlhf rm train` have one"
        )


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode(
    tokenizer,
    prompt: list[dict],
    response: list[dict],
    max_length: int,
    max_prompt_length: int | None = None,
) -> tuple[Tokenized, bool]:
    """(prompt + response as the reward model reads it, whether it was truncated).

    Chat template if the tokenizer has one, else a text pair with its special tokens. The
    loss mask marks the response (for encoders: the response and its closing special tokens).
    """
    mpl = max_prompt_length if max_prompt_length is not None else max_length // 2
    if uses_chat_template(tokenizer):
        return tokenize_response(tokenizer, prompt, response, max_length, mpl, keep="end")
    return _encode_text_pair(
        tokenizer, prompt_text(prompt), response[-1]["content"], max_length, mpl
    )


def encode_pair(
    tokenizer, pair: PreferencePair, max_length: int, max_prompt_length: int | None = None
) -> TokenizedPair | None:
    """A training pair as the reward model reads it: both responses whole, the prompt cut as
    needed (:func:`..data.pairs.tokenize_pair`); None when a response cannot fit."""
    if uses_chat_template(tokenizer):
        return tokenize_pair(tokenizer, pair, max_length, max_prompt_length)
    prompt, chosen, rejected = pair.conversations()
    room = max_length - tokenizer.backend_tokenizer.num_special_tokens_to_add(is_pair=True) - 1
    if any(len(tokenizer(m[-1]["content"], add_special_tokens=False)["input_ids"]) > room
           for m in (chosen, rejected)):
        return None
    mpl = max_prompt_length or max_length
    c, tc = encode(tokenizer, prompt, chosen, max_length, mpl)
    r, tr = encode(tokenizer, prompt, rejected, max_length, mpl)
    return TokenizedPair(c, r, tc or tr)


def prompt_text(prompt: list[dict]) -> str:
    """A prompt as plain text: its one message, or ``role: text`` lines (encoders, the PM's context)."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _encode_text_pair(
    tokenizer, prompt: str, response: str, max_length: int, max_prompt_length: int
) -> tuple[Tokenized, bool]:
    backend = tokenizer.backend_tokenizer
    p = backend.encode(prompt, add_special_tokens=False)
    r = backend.encode(response, add_special_tokens=False)
    room = max_length - backend.num_special_tokens_to_add(is_pair=True)
    truncated = len(p.ids) + len(r.ids) > room
    if truncated:
        keep_prompt = min(len(p.ids), max(room - len(r.ids), min(max_prompt_length, room - 1)))
        p.truncate(keep_prompt, direction="left")
        r.truncate(room - keep_prompt, direction="left")
    enc = backend.post_process(p, r, add_special_tokens=True)
    seq = enc.sequence_ids
    first = next((i for i, s in enumerate(seq) if s == 1), len(seq))
    return Tokenized(list(enc.ids), [i >= first for i in range(len(seq))]), truncated


def tokenize_pairs(
    tokenizer, rows: list[PairRow], cfg: PairLimits
) -> tuple[list[tuple[PairRow, TokenizedPair]], int, int]:
    """Training pairs as the reward model reads them, applying ``cfg.on_long``:
    ([(row, tokenized)], how many had their prompt cut, how many were skipped)."""
    out, truncated, skipped = [], 0, 0
    for row in tqdm(rows, desc="tokenize", disable=len(rows) < 5000, dynamic_ncols=True):
        tok = encode_training_pair(tokenizer, row, cfg)
        if tok is None:
            skipped += 1
            continue
        truncated += tok.truncated
        out.append((row, tok))
    return out, truncated, skipped


def encode_training_pair(tokenizer, row: PairRow, cfg: PairLimits) -> TokenizedPair | None:
    """One training pair (:func:`encode_pair`); None when it is too long to keep and
    ``cfg.on_long`` skips it, a :class:`UserError` naming the row when it refuses it."""
    tok = encode_pair(tokenizer, row.pair, cfg.max_length, cfg.max_prompt_length)
    if tok is None and cfg.on_long == "error":
        raise UserError(f"{row.where}: a response does not fit in data.max_length={cfg.max_length} "
                        "tokens (responses are never cut; set data.on_long=skip to skip such pairs)")
    return tok
