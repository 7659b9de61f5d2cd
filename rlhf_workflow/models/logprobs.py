"""Log-probabilities of target tokens, without ever building (batch, length, vocab) logits.

The one primitive behind SFT's loss, DPO's log-probs, the reference pass and the KL
evaluation. A causal LM's forward runs as usual up to its final hidden states; the LM head is
then applied only at positions that have a target, a chunk of positions at a time, each
chunk's fp32 log-softmax reduced to the target's log-probability at once. In training every
chunk is recomputed in the backward pass (activation checkpointing), so at most one chunk of
logits is alive at any time: with a 128K vocabulary and 64K target tokens a step holds 256 MiB
of logits instead of 32 GiB.

How the hidden states are taken: a pre-hook on the output embedding (the LM head) keeps its
input and hands the head an empty slice, so the model's own forward (under any wrapper: DDP,
FSDP2, DeepSpeed, PEFT) computes no logits. FSDP2 keeps the root module's parameters (the
head among them) gathered from the forward to the end of the backward, so the head can be
applied afterwards. Post-head transformations some architectures apply (Gemma's final
soft-capping, Cohere's logit scale) are applied here too.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..data.chat import IGNORE
from ..data.pairs import per_response
from .attention import model_inputs

CHUNK_BYTES = 256 * 2**20  # fp32 logits per chunk


def target_logps(model, inputs: dict, targets: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(target_t | tokens before t) for the last ``targets.shape[1]`` positions of the
    rows of ``inputs`` (``input_ids``, ``attention_mask``, ``position_ids``), (B, K) fp32,
    0 where the target is -100. Differentiable. ``at``: the flat indices of the target positions
    in ``targets``, found on the host when the batch was built (:func:`..data.batching.target_positions`),
    so that the forward never waits on the device; found here when not given."""
    hidden = final_hidden(model, inputs, targets.shape[1])
    flat = targets.flatten()
    if at is None:
        at = (flat != IGNORE).nonzero()[:, 0]
    logps = head_logps(model, hidden.flatten(0, 1).index_select(0, at), flat.index_select(0, at))
    out = torch.zeros(flat.shape, dtype=torch.float32, device=targets.device).index_put((at,), logps)
    return out.view(targets.shape)


def token_logps(model, batch: dict) -> torch.Tensor:
    """Target log-probs of a batch from :func:`..data.batching.collate_rows` or
    :func:`..data.pairs.collate_pairs`, (B, T - start): hidden states are kept only from the
    first target column on, and the LM head runs only at target tokens."""
    start = batch["target_start"]
    return target_logps(model, model_inputs(model, batch), batch["targets"][:, start:], batch["target_at"])


def response_logps(model, batch: dict) -> torch.Tensor:
    """Summed response log-probs of a padded batch: one per row, or per response in the
    shared-prompt layout (chosen first), i.e. (2N,) for a batch of N pairs."""
    return per_response(token_logps(model, batch), batch)


def final_hidden(model, inputs: dict, keep: int) -> torch.Tensor:
    """The final hidden states the LM head would read at the last ``keep`` positions, (B, keep, H)."""
    head = _inner(model).get_output_embeddings()
    seen = []

    def grab(module, args):
        seen.append(args[0])
        return (args[0][..., :0, :],)  # the head computes nothing

    handle = head.register_forward_pre_hook(grab)
    try:
        model(**inputs, logits_to_keep=keep, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def head_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log-softmax(head(hidden))[target] for N positions, (N, H) x (N,) -> (N,) fp32, in chunks."""
    inner = _inner(model)
    head = inner.get_output_embeddings()
    config = inner.config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)
    chunk = max(1, CHUNK_BYTES // (4 * (getattr(head, "out_features", None) or config.vocab_size)))

    def logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if scale is not None:
            logits = logits * scale
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits.gather(-1, t[:, None])[:, 0] - logits.logsumexp(-1)

    grad = torch.is_grad_enabled() and hidden.requires_grad
    if not len(hidden):  # no target here: nothing to compute, the graph kept whole
        return hidden.sum(-1).float()
    parts = [checkpoint(logps, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
             if grad else logps(hidden[i : i + chunk], targets[i : i + chunk])
             for i in range(0, len(hidden), chunk)]
    return torch.cat(parts)


def _inner(model):
    """The transformers model inside DDP/DeepSpeed and PEFT wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "peft_config"):
        model = model.base_model.model
    return model
