"""Sampling with ``transformers.generate``: left padding, length-sorted prompt batches, and
the n samples of a prompt sharing one prefill (its KV cache is computed once and repeated).

Returns, for each prompt in the caller's order, ``n`` samples with their text, finish reason
(``stop`` when an end-of-turn/stop token was produced, ``length`` when the token budget ran
out) and token count.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.chat import encode_prompt
from ..distributed import rank_and_world
from ..errors import UserError
from .sampling import Sample, SamplingConfig, stop_token_ids


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[list[dict]], cfg: SamplingConfig,
                progress: bool = True, shard: bool = False) -> list[list[Sample]]:
    """``cfg.n`` samples for each prompt (a message list), in the order of ``prompts``.

    Every batch draws its own seed from ``cfg.seed`` in turn, so with ``shard`` (each rank of a
    process group a whole copy of the model) batch b runs on rank ``b % world`` and every rank
    returns all the samples: the same samples as one process."""
    model.eval()
    stops = stop_token_ids(model.generation_config, tokenizer) + cfg.stop_token_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    strings = {"stop_strings": cfg.stop, "tokenizer": tokenizer} if cfg.stop else {}
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    _check_room(model, encoded, prompts, cfg.max_new_tokens)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[list[Sample]] = [[] for _ in prompts]
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = range(0, len(order), cfg.batch_size)
    seeds = [int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in starts]
    rank, world = rank_and_world() if shard else (0, 1)
    device = next(model.parameters()).device
    bar = tqdm(total=len(prompts) * cfg.n, desc="generate", disable=not progress or rank != 0, dynamic_ncols=True)
    for b, seed in list(zip(starts, seeds, strict=True))[rank::world]:
        idx = order[b : b + cfg.batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]) :] = 1
        torch.manual_seed(seed)
        greedy = cfg.temperature == 0  # n identical samples: decode once, repeat
        sampling = {"do_sample": False, "top_k": None, "top_p": None} if greedy else {
            "do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "top_k": cfg.top_k or None}
        copies = 1 if greedy else cfg.n
        ids, mask = ids.to(device), mask.to(device)
        cache = _shared_prefill(model, ids, mask, copies) if copies > 1 else None
        out = model.generate(
            input_ids=ids.repeat_interleave(copies, 0), attention_mask=mask.repeat_interleave(copies, 0),
            past_key_values=cache, max_new_tokens=cfg.max_new_tokens,
            eos_token_id=stops, pad_token_id=pad, **sampling, **strings,
        )[:, width:].cpu()
        for r, row in enumerate(out.tolist()):
            sample = _sample(tokenizer, row, stops, cfg.max_new_tokens, pad, cfg.stop)
            results[idx[r // copies]].extend([sample] * (cfg.n // copies))
        bar.update(min(world * len(idx) * cfg.n, bar.total - bar.n))
    bar.close()
    if world > 1:  # each prompt was sampled on one rank: gather them all everywhere
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, results)
        results = [next(part[i] for part in parts if part[i]) for i in range(len(prompts))]
    return results


def _check_room(model, encoded: list[list[int]], prompts: list[list[dict]], max_new_tokens: int) -> None:
    """Refuse prompts that leave the model too few positions for ``max_new_tokens``."""
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not positions:
        return
    long = [i for i, ids in enumerate(encoded) if len(ids) + max_new_tokens > positions]
    if long:
        i = long[0]
        raise UserError(
            f"{len(long)} prompt(s) too long for the model: one ({prompts[i][-1]['content'][:40]!r}...) has "
            f"{len(encoded[i])} tokens, and the model's {positions} positions leave room for "
            f"{max(positions - max_new_tokens, 0)} with sampling.max_new_tokens={max_new_tokens}; shorten them "
            "or lower max_new_tokens")


def _shared_prefill(model, ids: torch.Tensor, mask: torch.Tensor, copies: int):
    """The KV cache of each prompt (all but its last token), computed once and repeated for its
    ``copies`` samples; positions follow the left padding as ``generate`` computes them."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(copies)
    return cache


def _sample(tokenizer, tokens: list[int], stops: list[int], budget: int, pad: int | None = None,
            stop_strings: list[str] = ()) -> Sample:
    """Cut a generated row at its first stop token (kept in ``token_ids``) or stop string."""
    end = next((t for t, tok in enumerate(tokens) if tok in stops), None)
    if end is None:
        ids = tokens[:budget]
        while stop_strings and ids and ids[-1] == pad:  # padding after a stop-string finish
            ids = ids[:-1]
        kept, reason = ids, "length"
    else:
        kept, ids, reason = tokens[:end], tokens[: end + 1], "stop"
    text = tokenizer.decode(kept, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop_strings if s in text]
    if cuts:
        text, reason = text[: min(cuts)], "stop"
    return Sample(text, reason, len(ids), tuple(ids))
