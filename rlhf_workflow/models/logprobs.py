"""Log-probabilities of target tokens, without ever building (batch, length, vocab) logits.

The one primitive behind SFT's loss, DPO's log-probs, the reference pass and the KL
evaluation. A causal LM's forward runs as usual up to its final hidden states; the LM head is
then applied only at positions that have a target, a chunk of positions at a time, each
chunk's fp32 log-softmax reduced to the target's log-probability at once. In training every
chunk is recomputed in the backward pass, so at most one chunk of logits is alive at any time:
with a 128K vocabulary and 64K target tokens a step holds 256 MiB of logits instead of 32 GiB.
A plain linear head is called once per micro-batch with the chunks looped inside it (its
gradient written by hand), so a sharded head (ZeRO-3, FSDP2) is gathered once, not per chunk.

How the hidden states are taken: a pre-hook on the output embedding (the LM head) keeps its
input and hands the head an empty slice, so the model's own forward (under any wrapper: DDP,
FSDP2, DeepSpeed, PEFT) computes no logits. FSDP2 keeps the root module's parameters (the
head among them) gathered from the forward to the end of the backward, so the head can be
applied afterwards. Post-head transformations some architectures apply (Gemma's final
soft-capping, Cohere's logit scale) are applied here too.
"""

from __future__ import annotations

from contextlib import ExitStack

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
    """log-softmax(head(hidden))[target] for N positions, (N, H) x (N,) -> (N,) fp32, in chunks.

    A plain linear head is called once for all N positions, the chunks looped inside it (forward
    and backward by hand, :class:`_ChunkedHead`): under ZeRO-3 or a sharded head the weight is
    gathered once per micro-batch, not per chunk, and no chunk is run a third time to recompute
    it. Any other head (a LoRA-wrapped one) runs per chunk under activation checkpointing."""
    inner = _inner(model)
    head = inner.get_output_embeddings()
    config = inner.config.get_text_config()
    post = (getattr(config, "logit_scale", None), getattr(config, "final_logit_softcapping", None))
    chunk = max(1, CHUNK_BYTES // (4 * (getattr(head, "out_features", None) or config.vocab_size)))
    if not len(hidden):  # no target here: nothing to compute, the graph kept whole
        return hidden.sum(-1).float()
    if isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward:  # FSDP's subclass too
        def fused(h: torch.Tensor) -> torch.Tensor:
            return _ChunkedHead.apply(h, head.weight, head.bias, targets, chunk, post)

        head.forward = fused  # through the module call, so the wrappers' gather hooks run once
        try:
            return head(hidden)
        finally:
            del head.forward

    def logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = _post(head(h).float(), *post)[0]
        return logits.gather(-1, t[:, None])[:, 0] - logits.logsumexp(-1)

    grad = torch.is_grad_enabled() and hidden.requires_grad
    parts = [checkpoint(logps, hidden[i : i + chunk], targets[i : i + chunk], use_reentrant=False)
             if grad else logps(hidden[i : i + chunk], targets[i : i + chunk])
             for i in range(0, len(hidden), chunk)]
    return torch.cat(parts)


def _post(logits: torch.Tensor, scale: float | None, cap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-head transformations (Cohere's logit scale, Gemma's final soft-capping) of fp32
    logits, and their derivative as a factor (1 where there is none)."""
    slope = torch.ones((), device=logits.device)
    if scale is not None:
        logits, slope = logits * scale, slope * scale
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
        slope = slope * (1 - (logits / cap) ** 2)
    return logits, slope


class _ChunkedHead(torch.autograd.Function):
    """log-softmax(post(h @ W.T + b))[t] a chunk of rows at a time: one fp32 chunk of logits alive,
    recomputed once in the backward. Matmuls run in the ambient autocast dtype, as the head's own
    would."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, post):
        ctx.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]
        ctx.chunk, ctx.post = chunk, post
        ctx.save_for_backward(hidden, weight, bias, targets)
        out = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        for i in range(0, len(hidden), chunk):
            logits = _post(torch.nn.functional.linear(hidden[i : i + chunk], weight, bias).float(), *post)[0]
            out[i : i + chunk] = logits.gather(-1, targets[i : i + chunk, None])[:, 0] - logits.logsumexp(-1)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        with _autocast(ctx.autocast):
            grad_h = torch.empty_like(hidden)
            # in the weight's dtype, as autograd would accumulate the chunks (no fp32 copy of a bf16 head)
            grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
            grad_b = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
            for i in range(0, len(hidden), ctx.chunk):
                h, t, g = hidden[i : i + ctx.chunk], targets[i : i + ctx.chunk], grad_out[i : i + ctx.chunk]
                raw = torch.nn.functional.linear(h, weight, bias)
                logits, slope = _post(raw.float(), *ctx.post)
                d = -torch.softmax(logits, -1) * g[:, None]  # d out / d logits, times the incoming grad
                d[torch.arange(len(t), device=d.device), t] += g
                d = (d * slope).to(raw.dtype)
                grad_h[i : i + ctx.chunk] = d @ weight.to(raw.dtype)
                if grad_w is not None:
                    grad_w += (d.T @ h.to(raw.dtype)).to(grad_w.dtype)
                if grad_b is not None:
                    grad_b += d.sum(0).to(grad_b.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _autocast(states) -> ExitStack:
    """Re-enter the forward's autocast state (backward runs outside it)."""
    stack = ExitStack()
    for device, enabled, dtype in states:
        if enabled:
            stack.enter_context(torch.autocast(device, dtype=dtype))
    return stack


def _inner(model):
    """The transformers model inside DDP/DeepSpeed and PEFT wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "peft_config"):
        model = model.base_model.model
    return model
