"""The attention mask of a batch, in the form the model's attention implementation takes.

A row of a batch holds one sequence, several packed sequences (``seq_ids`` 1, 2, ..., 0 for
padding; ``position_ids`` restarting at 0 for each), or pairs in the shared-prompt layout
(``branch``: 0 the prompt, 1 the chosen response, 2 the rejected one, which does not see the
chosen). A token sees the earlier tokens of its own sequence, and in a pair's second branch
only the prompt and itself. What the model is handed for that:

- one sequence per row: the 2-D padding mask;
- flash attention: nothing; transformers reads the packed sequences from ``position_ids``
  (varlen kernels). A branch cannot be written that way: the shared-prompt layout is not
  used with flash attention;
- FlexAttention: a ``BlockMask`` built from the rule above, (T/128)^2 blocks per row, never a
  (T, T) tensor, and the kernel skips the blocks nothing sees;
- SDPA: a boolean (B, 1, T, T) mask (a quarter of an fp32 additive mask, no fill temporaries);
- eager attention: the additive mask it adds to the scores, in the weights' dtype.

A padding token sees itself only, so that no row of the softmax is empty.
"""

from __future__ import annotations

import torch

from .loading import param_dtype, unwrap


def implementation(model) -> str:
    return unwrap(model).config._attn_implementation or "eager"


def model_inputs(model, batch: dict) -> dict:
    """``input_ids``, ``attention_mask`` and ``position_ids`` of ``batch`` for ``model``."""
    mask = attention_mask(batch, implementation(model), param_dtype(model))
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"]}


def attention_mask(batch: dict, impl: str, dtype: torch.dtype):
    seq_ids, branch = batch["seq_ids"], batch.get("branch")
    if not batch["packed"] and branch is None:
        return (seq_ids > 0).long()
    if impl.startswith("flash"):
        if branch is not None:
            raise ValueError("the shared-prompt layout needs a 4-D mask, which flash attention does not take")
        return None
    if impl == "flex_attention":
        return _block_mask(seq_ids, branch)
    at = torch.arange(seq_ids.shape[1], device=seq_ids.device)
    allowed = _sees(seq_ids, branch, at[:, None], at[None, :], rows=slice(None))[:, None]
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _sees(seq_ids, branch, q, kv, rows):
    """Whether query position ``q`` sees key position ``kv`` in ``rows`` (broadcasting)."""
    sq, skv = seq_ids[rows, q], seq_ids[rows, kv]
    ok = (sq == skv) & (sq > 0) & (kv <= q)
    if branch is not None:
        bq, bkv = branch[rows, q], branch[rows, kv]
        ok = ok & ((bkv == 0) | (bkv == bq))
    return ok | (q == kv)


def _block_mask(seq_ids: torch.Tensor, branch: torch.Tensor | None):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return _sees(seq_ids, branch, q, kv, rows=b)

    b, t = seq_ids.shape
    return create_block_mask(mask_mod, b, None, t, t, device=seq_ids.device)
