"""Pairwise preference model (PM): ``rlhf pm train`` and order-averaged comparisons.

A causal LM reads one user turn ``[CONTEXT] {context} [RESPONSE A] {a} [RESPONSE B] {b}``
through its chat template and answers with the single token ``A`` or ``B``; the loss is the
next-token cross-entropy at that one position (SLiC-HF style; paper defaults lr 5e-6, 1 epoch).
Which side the chosen response is shown on is drawn per pair from a seeded RNG.

Inference: softmax over just the two label tokens' logits at the answer position, for both
orders, ``P(a > b) = 0.5 * (P_A(a, b) + 1 - P_A(b, a))`` - a constant position bias cancels.

Deviations: the paper packs sequences (length 3072); here each comparison is one left-padded
row, so the answer position is the last one and only its logits are computed. When a
comparison is too long, the context is cut from the left first, then both responses from
their start (their ends, where answers usually are, stay visible); such pairs are counted.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import Config, ModelConfig, OptimConfig, TrainConfig
from ..data.chat import encode_prompt, render
from ..data.pairs import CHARS_PER_TOKEN
from ..data.readers import PairRow, fmt_counts, read_pairs, split_held_out
from ..data.token_cache import Lazy, TokenCache, tokenize_cached
from ..distributed import is_sharded, run_batched, to_device
from ..errors import UserError
from ..models.loading import load_tokenizer, pad_id
from ..training.checkpoints import start_run
from ..training.engine import load_frozen, load_trainable
from ..training.loop import StepOutput, TrainData, train
from .bt import PairDataConfig, write_eval
from .encoding import prompt_text
from .metrics import held_out_accuracies

LABELS = ("A", "B")
TEMPLATE = "[CONTEXT] {context} [RESPONSE A] {a} [RESPONSE B] {b}"


class PMConfig(Config):
    model: ModelConfig = ModelConfig(path="meta-llama/Meta-Llama-3-8B-Instruct")
    data: PairDataConfig = PairDataConfig(max_length=3072)
    optim: OptimConfig = OptimConfig(lr=5e-6, warmup_ratio=0.03)
    train: TrainConfig = TrainConfig(
        output_dir="runs/pm", epochs=1, global_batch_size=128, micro_batch_size=8, eval_every=100
    )
    eval_batch_size: int = Field(32, ge=1, description="sequences per forward pass when evaluating")


# --------------------------------------------------------------------------- tokenization


def label_token_ids(tokenizer) -> tuple[int, int]:
    """Ids of ``A`` and ``B``; a :class:`UserError` unless each is one token, they differ, and
    the chat template emits exactly that token as the assistant's answer."""
    ids = [tokenizer.encode(x, add_special_tokens=False) for x in LABELS]
    if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
        raise UserError(
            f"tokenizer {tokenizer.name_or_path!r} cannot serve a preference model: the labels "
            f"'A' and 'B' must be single, distinct tokens, got {ids[0]} and {ids[1]}"
        )
    msgs = pm_messages([{"role": "user", "content": "x"}], "y", "z")
    prompt = encode_prompt(tokenizer, msgs)
    for x, (tid,) in zip(LABELS, ids, strict=True):
        full = tokenizer(
            render(tokenizer, msgs + [{"role": "assistant", "content": x}]),
            add_special_tokens=False,
        )["input_ids"]
        if full[: len(prompt)] != prompt or full[len(prompt) : len(prompt) + 1] != [tid]:
            raise UserError(
                f"the chat template of {tokenizer.name_or_path!r} does not render the answer {x!r} "
                f"as token {tid} right after the assistant header"
            )
    return ids[0][0], ids[1][0]


def pm_messages(prompt: list[dict], a: str, b: str) -> list[dict]:
    """The one user turn the PM reads (a multi-turn context is flattened as ``role: text``)."""
    return [{"role": "user", "content": TEMPLATE.format(context=prompt_text(prompt), a=a, b=b)}]


def encode_comparison(
    tokenizer, prompt: list[dict], a: str, b: str, max_length: int, whole_responses: bool = False
) -> tuple[list[int] | None, bool]:
    """(prompt ids ending with the assistant header, whether it was truncated); the label
    token is appended for training, so the ids are at most ``max_length - 1`` long. With
    ``whole_responses`` (training) only the context is cut, and ids are None when the two
    responses do not fit."""
    limit_chars = max_length * CHARS_PER_TOKEN
    if whole_responses and max(len(a), len(b)) > limit_chars:
        return None, True
    prompt = [{**m, "content": m["content"][-limit_chars:]} for m in prompt]
    a, b = a[-limit_chars:], b[-limit_chars:]
    ids = encode_prompt(tokenizer, pm_messages(prompt, a, b))
    limit = max_length - 1
    if len(ids) <= limit:
        return ids, False
    tok = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx, ta, tb = tok(prompt_text(prompt)), tok(a), tok(b)
    budget = limit - (len(ids) - len(ctx) - len(ta) - len(tb))
    for _ in range(4):  # re-tokenising cut text can shift a few tokens: retry with less room
        if whole_responses and budget - len(ta) - len(tb) < 1:
            return None, True
        if budget < 3:
            break
        keep_ctx = max(budget - len(ta) - len(tb), 0 if whole_responses else min(len(ctx), budget // 4))
        keep_ctx = min(keep_ctx, len(ctx))
        room = budget - keep_ctx
        ka = min(len(ta), max(room // 2, room - len(tb)))
        kb = min(len(tb), room - ka)
        cut = lambda t, k: tokenizer.decode(t[len(t) - k :]) if k > 0 else ""  # noqa: E731
        context = [{"role": "user", "content": cut(ctx, keep_ctx)}]
        ids = encode_prompt(tokenizer, pm_messages(context, cut(ta, ka), cut(tb, kb)))
        if len(ids) <= limit:
            return ids, True
        budget -= len(ids) - limit
    raise UserError(f"max_length {max_length} leaves no room for a comparison after the template")


def collate_comparisons(
    seqs: list[list[int]], pad_id: int, labels: list[int] | None = None
) -> dict:
    """Left-padded rows (the answer position is the last column) with explicit positions."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "num_items": len(seqs),
        "num_tokens": int(mask.sum()),
    }
    if labels is not None:
        batch["labels"] = torch.tensor(labels)
    return batch


def answer_logits(model, batch: dict) -> torch.Tensor:
    """Full-vocabulary logits at the answer position, (B, V)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=1,
    )
    return out.logits[:, -1].float()


def make_objective(label_ids: tuple[int, int]):
    ids = list(label_ids)

    def pm_objective(model, batch: dict) -> StepOutput:
        """Summed cross-entropy of the label token, and accuracy between the two labels."""
        logits = answer_logits(model, batch)
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        pick = torch.tensor(ids, device=logits.device)[logits[:, ids].argmax(-1)]
        return StepOutput(loss, {"accuracy": (pick == batch["labels"]).float().sum()})

    return pm_objective


# --------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class Comparisons:
    probs: list[float]  # order-averaged P(a better than b), one per item
    first: list[float]  # raw P(answer A) per row: (a, b) then (b, a) for each item
    truncated: int  # items whose comparison had to be cut to max_length


def compare(model, tokenizer, items: list[tuple[list[dict], str, str]], batch_size: int = 32,
            max_length: int = 3072, progress: bool = False, shard: bool = False) -> Comparisons:
    """``P(a better than b)`` for each (prompt messages, a, b), averaged over both orders.

    Two model rows per item, run in length-sorted batches (with ``shard``, shared out over the
    ranks); the results keep the input order.
    """
    label_ids = list(label_token_ids(tokenizer))
    seqs, truncated = [], 0
    for prompt, a, b in items:
        (ab, t1), (ba, t2) = (
            encode_comparison(tokenizer, prompt, a, b, max_length),
            encode_comparison(tokenizer, prompt, b, a, max_length),
        )
        seqs += [ab, ba]
        truncated += t1 or t2
    p = first_position_probs(model, seqs, label_ids, pad_id(tokenizer), batch_size, progress, shard)
    return Comparisons([0.5 * (p[2 * i] + 1.0 - p[2 * i + 1]) for i in range(len(items))], p, truncated)


def first_position_probs(
    model,
    seqs: list[list[int]],
    label_ids: list[int],
    pad_id: int,
    batch_size: int = 32,
    progress: bool = False,
    shard: bool = False,
) -> list[float]:
    """``P(A)`` from a softmax over the two label logits, per encoded comparison."""
    model.eval()
    device = next(model.parameters()).device

    def run(idx: list[int]) -> torch.Tensor:
        batch = to_device(collate_comparisons([seqs[i] for i in idx], pad_id), device)
        return answer_logits(model, batch)[:, label_ids].softmax(-1)[:, 0]

    return run_batched([len(s) for s in seqs], batch_size, run, shard or is_sharded(model),
                       "compare" if progress else None).tolist()


def load_preference_model(spec: ModelConfig | str | Path, dtype: str = "fp32", device=None,
                          shard: bool = False):
    """(model, tokenizer) of a trained PM (a model spec, or a path loaded in ``dtype``) in eval
    mode on ``device`` (default: this process's device), sharded over the ranks with ``shard``
    (:func:`..training.engine.load_frozen`); checks the label tokens."""
    spec = spec if isinstance(spec, ModelConfig) else ModelConfig(path=str(spec), dtype=dtype)
    tokenizer = load_tokenizer(spec)
    label_token_ids(tokenizer)
    model, _ = load_frozen(spec, shard)
    return (model.to(device) if device else model), tokenizer


# --------------------------------------------------------------------------- pm train


def run_pm_train(cfg: PMConfig, on_step=None) -> Path:
    """Train a PM; writes ``<output_dir>/model`` and ``<output_dir>/eval.json``."""
    out = Path(cfg.train.output_dir)
    if start_run(cfg, cfg.train) is not None:
        return out / "model"
    tokenizer = load_tokenizer(cfg.model)
    label_ids = label_token_ids(tokenizer)  # fail before reading data or loading weights
    d = cfg.data
    rows, bad = read_pairs(d.train, d.split, d.on_bad)
    if d.test:
        test_rows, bad_test = read_pairs(d.test, d.split, d.on_bad)
        bad += bad_test
    else:
        rows, test_rows = split_held_out(rows, d.eval_fraction, cfg.train.seed)

    cache = tokenize_comparisons(cfg, tokenizer, rows, label_ids)
    if not len(cache):
        raise UserError(f"{d.train}: no pair left to train on")
    seqs, labels = Lazy(len(cache), cache.input_ids), cache.field("label").tolist()
    n_trunc, n_long = int(cache.field("truncated").sum()), cache.skipped
    print(
        f"pm: {len(seqs)} training comparisons ({sum(x == label_ids[0] for x in labels)} with "
        f"the chosen response as A), {len(test_rows)} held out; truncated {n_trunc}, skipped "
        f"{n_long} over-long" + (f", skipped invalid: {fmt_counts(bad)}" if bad else "")
    )

    pad = pad_id(tokenizer)

    def collate(batch_rows: list[list[int]]) -> dict:
        idx = [i for row in batch_rows for i in row]  # (by tokens: a row each, left-padded, not packed)
        return collate_comparisons([seqs[i] for i in idx], pad, [labels[i] for i in idx])

    def evaluate(m) -> dict[str, float]:
        return evaluate_pm(m, tokenizer, test_rows, d.max_length, cfg.eval_batch_size) if test_rows else {}

    model, _ = load_trainable(cfg.train, cfg.model)
    data = TrainData(cache.lengths()[:, 0].tolist(), collate, by_tokens=True)

    def finish(record: dict) -> None:
        result = {"train_pairs": len(seqs), "held_out_pairs": len(test_rows), "truncated": n_trunc,
                  "skipped_long": n_long, "skipped_invalid": dict(bad),
                  **{k[5:]: v for k, v in record.items() if k.startswith("eval/")}}
        write_eval(out, result, "pm", len(test_rows))

    train(model, tokenizer, data, make_objective(label_ids), cfg.train, cfg.optim, run_config=cfg,
          evaluate=evaluate, on_step=on_step, finish=finish)
    return out / "model"


def build_comparisons(
    tokenizer, rows: list[PairRow], d: PairDataConfig, seed: int, label_ids: tuple[int, int]
) -> tuple[list[list[int]], list[int], int, int]:
    """(prompt ids, label id) per training pair, the chosen response shown first (label ``A``)
    or second (``B``) as a seeded coin decides; plus the truncated and skipped counts."""
    seqs, labels, n_trunc, n_long = [], [], 0, 0
    for row, first in zip(rows, chosen_first(len(rows), seed), strict=True):
        got = encode_training_comparison(tokenizer, row, first, d, label_ids)
        if got is None:
            n_long += 1
            continue
        ids, label, truncated = got
        n_trunc += truncated
        seqs.append(ids)
        labels.append(label)
    return seqs, labels, n_trunc, n_long


def chosen_first(n: int, seed: int) -> list[bool]:
    """Per training pair, whether the chosen response is shown first: one seeded coin each."""
    rng = random.Random(f"{seed}/pm-positions")
    return [rng.random() < 0.5 for _ in range(n)]


def encode_training_comparison(tokenizer, row: PairRow, first: bool, d: PairDataConfig,
                               label_ids: tuple[int, int]) -> tuple[list[int], int, bool] | None:
    """(prompt ids, label id, whether the context was cut) of one training pair, the chosen
    response shown first if ``first``; None when the responses cannot fit and ``d.on_long``
    skips it, a :class:`UserError` naming the row when it refuses it."""
    prompt, chosen, rejected = row.pair.conversations()
    c, r = chosen[-1]["content"], rejected[-1]["content"]
    ids, truncated = encode_comparison(
        tokenizer, prompt, *((c, r) if first else (r, c)), d.max_length, whole_responses=True
    )
    if ids is None and d.on_long == "error":
        raise UserError(
            f"{row.where}: the two responses do not fit in data.max_length={d.max_length} tokens "
            "(responses are never cut; set data.on_long=skip to skip such pairs)"
        )
    return None if ids is None else (ids, label_ids[0 if first else 1], truncated)


def tokenize_comparisons(cfg: PMConfig, tokenizer, rows: list[PairRow], label_ids: tuple[int, int]) -> TokenCache:
    """The training comparisons of ``rows`` (:func:`build_comparisons`, with fields ``label``
    and ``truncated``), from the token cache or tokenized once into it."""
    d = cfg.data
    firsts = chosen_first(len(rows), cfg.train.seed)
    settings = {"part": "train", "held_out": None if d.test else [d.eval_fraction, cfg.train.seed],
                "positions_seed": cfg.train.seed, "max_length": d.max_length, "on_long": d.on_long,
                "on_bad": d.on_bad}

    def encode(i: int, row: PairRow):
        got = encode_training_comparison(tokenizer, row, firsts[i], d, label_ids)
        return None if got is None else ((got[0],), {"label": got[1], "truncated": got[2]})

    return tokenize_cached("pm", (d.train, d.split), settings, tokenizer, rows, encode, ("label", "truncated"),
                           masks=False, enabled=d.token_cache, progress=cfg.train.progress, noun="comparisons",
                           on_bad=d.on_bad, locate=lambda i: rows[i].where)


def evaluate_pm(model, tokenizer, rows: list[PairRow], max_length: int, batch_size: int = 32) -> dict:
    """A preference model's held-out loss and accuracy overall and per subset, plus its mean
    ``P(A)`` over both orders (``p_first``: 0.5 for a model without position bias)."""
    was_training = model.training
    items = [(prompt, chosen[-1]["content"], rejected[-1]["content"])
             for prompt, chosen, rejected in (row.pair.conversations() for row in rows)]
    c = compare(model, tokenizer, items, batch_size, max_length, shard=True)
    model.train(was_training)
    p = c.first  # chosen shown first (answer A), then second (answer B)
    nll = [-math.log(max(p[2 * i], 1e-12)) - math.log(max(1 - p[2 * i + 1], 1e-12)) for i in range(len(rows))]
    return {"loss": sum(nll) / (2 * len(rows)), "p_first": sum(p) / len(p),
            **held_out_accuracies([row.pair.subset for row in rows], [q - 0.5 for q in c.probs])}
