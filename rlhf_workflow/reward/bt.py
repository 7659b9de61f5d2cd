"""Bradley-Terry reward model: ``rlhf rm train`` and the scoring API.

A sequence-classification model with one output reads ``prompt + response`` (as
:mod:`.encoding` renders it) and returns a scalar reward; training minimises
``-log sigmoid(r_chosen - r_rejected - margin)`` with the chosen and rejected sequences of
each pair in the same forward pass (RECIPE.md, paper defaults: global batch 512, lr 2e-6,
1 epoch, cosine, warmup 0.03).

**Shared prompt.** A decoder reads a pair as one row: the prompt once, then the chosen and
the rejected response, each at the positions it has in its own sequence, a mask keeping them
apart; the head reads each response's last token. Same rewards as two rows, with the prompt
computed once (``data.share_prompt``; encoders and flash attention use two rows).

Scoring rollouts is ``rlhf annotate annotator.kind=bt`` (chunked, sharded, resumable), on
:func:`score`; the held-out evaluation is :func:`evaluate_bt`, RewardBench's :mod:`..evaluation.judges`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..config import Config, ModelConfig, OptimConfig, PairLimits, TrainConfig
from ..data.batching import collate_rows
from ..data.chat import IGNORE, Tokenized
from ..data.pairs import TokenizedPair, collate_pairs
from ..data.readers import PairRow, fmt_counts, read_pairs, split_held_out
from ..data.token_cache import PAIR_FIELDS, Lazy, TokenCache, pair_example, tokenize_cached
from ..distributed import is_sharded, run_batched, to_device
from ..errors import UserError
from ..io import write_json
from ..losses import bt_loss
from ..models.attention import model_inputs
from ..models.loading import (
    load_tokenizer,
    load_with_info,
    pad_id,
    unwrap,
    uses_flash_attention,
)
from ..training.checkpoints import start_run
from ..training.engine import load_frozen, load_trainable
from ..training.loop import StepOutput, TrainData, train
from .encoding import (
    PAD_TOKEN,
    check_pad,
    encode,
    encode_training_pair,
    ensure_pad_token,
    uses_chat_template,
)
from .implicit import ImplicitReward, load_implicit_reward
from .metrics import held_out_accuracies

# --------------------------------------------------------------------------- configs


class PairDataConfig(PairLimits):
    train: str = Field(
        "hendrydong/preference_700K",
        description="preference pairs: .jsonl/.parquet file or hub dataset",
    )
    test: str | None = Field(
        None, description="held-out pairs (default: hold out eval_fraction of train)"
    )
    split: str = Field("train", description="split, for hub datasets")
    eval_fraction: float = Field(
        0.01, ge=0, lt=1, description="share of train held out when test is unset"
    )
    on_bad: Literal["error", "skip"] = Field(
        "error",
        description="invalid pair (missing/non-string field, empty or identical responses): "
        "fail, or skip and count",
    )


class RMDataConfig(PairDataConfig):
    margin_field: str | None = Field(
        None,
        description="numeric field (top level or in meta) used as the BT margin (Llama-2 style)",
    )
    share_prompt: bool = Field(
        True,
        description="decoders: one row per pair, the prompt once, then chosen and rejected behind "
        "a mask (not with flash attention)",
    )


class RMConfig(Config):
    model: ModelConfig = ModelConfig(path="meta-llama/Meta-Llama-3-8B-Instruct")
    data: RMDataConfig = RMDataConfig()
    optim: OptimConfig = OptimConfig(lr=2e-6, warmup_ratio=0.03)
    train: TrainConfig = TrainConfig(
        output_dir="runs/rm", epochs=1, global_batch_size=512, micro_batch_size=8, eval_every=100
    )
    eval_batch_size: int = Field(32, ge=1, description="sequences per forward pass when evaluating")


# --------------------------------------------------------------------------- model forward


def bt_rewards(model, batch: dict) -> torch.Tensor:
    """Scalar reward per row, (B,). Rows are right-padded; the head reads the last real token
    (decoders, via the dedicated pad token) or ``[CLS]`` (encoders). In the shared-prompt
    layout, one reward per response, (2N,), the chosen first."""
    if "branch" in batch:
        hidden = model(**model_inputs(model, batch), output_hidden_states=True).hidden_states[-1]
        rows = batch["pair_row"]
        last = torch.cat([hidden[rows, batch["ends"][:, 0]], hidden[rows, batch["ends"][:, 1]]])
        return unwrap(model).score(last)[:, 0].float()
    extra = {}
    if getattr(unwrap(model).config, "type_vocab_size", 0) > 1:  # text pairs: response tokens are type 1
        types = torch.zeros_like(batch["input_ids"])
        types[:, 1:] = (batch["targets"][:, :-1] != IGNORE).long()
        extra["token_type_ids"] = types
    out = model(input_ids=batch["input_ids"], attention_mask=(batch["seq_ids"] > 0).long(), **extra)
    return out.logits[:, 0].float()


def shares_prompt(model, tokenizer) -> bool:
    """Whether pairs can use the shared-prompt layout: a decoder reading the chat template,
    with a ``score`` head, and attention that takes a 4-D mask (not flash attention)."""
    return uses_chat_template(tokenizer) and hasattr(model, "score") and not uses_flash_attention(model)


def bt_objective(model, batch: dict) -> StepOutput:
    """Summed BT loss over the N pairs of a batch (2N rows, chosen first, or N shared-prompt
    rows), plus metrics."""
    r = bt_rewards(model, batch)
    n = batch["num_items"]
    chosen, rejected = r[:n], r[n:]
    loss = bt_loss(chosen, rejected, batch.get("margin", 0.0)).sum()
    diff = (chosen - rejected).detach()
    metrics = {"accuracy": (diff > 0).float().sum(), "margin": diff.sum(), "reward_chosen": chosen.detach().sum()}
    return StepOutput(loss, metrics)  # (accuracy: a tie counts 0, as RewardBench counts it)


def score_tokenized(
    model,
    seqs: list[Tokenized],
    pad_id: int,
    batch_size: int = 32,
    progress: bool = False,
    sort_by_length: bool = True,
    shard: bool = False,
) -> list[float]:
    """Rewards of tokenized sequences in their order (of a BT model, or an
    :class:`.implicit.ImplicitReward`), computed in length-sorted batches (with ``shard``,
    shared out over the ranks of the process group)."""
    device = next(model.parameters()).device

    def run(idx: list[int]) -> torch.Tensor:
        batch = to_device(collate_rows([[(seqs[i].input_ids, seqs[i].targets())] for i in idx], pad_id), device)
        return model(batch) if isinstance(model, ImplicitReward) else bt_rewards(model, batch)

    return run_batched([len(s.input_ids) for s in seqs], batch_size, run, shard or is_sharded(model),
                       "score" if progress else None, sort_by_length).tolist()


def score(
    model,
    tokenizer,
    prompts: list[list[dict]],
    responses: list[str],
    batch_size: int = 32,
    max_length: int = 2048,
    progress: bool = True,
    max_prompt_length: int | None = None,
    sort_by_length: bool = True,
    shard: bool = False,
) -> list[float]:
    """Reward of each (prompt messages, response text), in the input order. No gradients;
    the model's dtype decides the precision (see :func:`load_reward_model`). With ``shard`` the
    batches are shared out over the ranks (each holding the model; a sharded model always is)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not isinstance(model, ImplicitReward):
        check_pad(model, tokenizer)
    model.eval()
    seqs = [
        encode(tokenizer, p, [{"role": "assistant", "content": r}], max_length, max_prompt_length)[
            0
        ]
        for p, r in zip(prompts, responses, strict=True)
    ]
    return score_tokenized(model, seqs, pad_id(tokenizer), batch_size, progress, sort_by_length, shard)


def load_reward_model(spec: ModelConfig | str | Path, dtype: str = "fp32", device=None,
                      reference: str | None = None, beta: float = 0.1, shard: bool = False):
    """(model, tokenizer) of a trained reward model (a model spec, or a path loaded in
    ``dtype``) in eval mode, on ``device`` (default: this process's device); with
    ``reference``, the DPO implicit reward of the policy ``spec`` (:mod:`.implicit`). With
    ``shard`` (several ranks), sharded over them with FSDP2 (see :func:`..training.engine.load_frozen`)."""
    spec = spec if isinstance(spec, ModelConfig) else ModelConfig(path=str(spec), dtype=dtype)
    if reference is not None:
        judge, tokenizer = load_implicit_reward(spec, reference, beta, shard)
        return (judge.to(device) if device else judge).eval(), tokenizer
    tokenizer = load_tokenizer(spec)
    model, missing = load_frozen(spec, shard, head="seq_cls", num_labels=1)
    if missing:
        raise UserError(f"{spec.path} is not a trained reward model: weights {', '.join(missing)} "
                        "are missing from the checkpoint")
    check_pad(model, tokenizer)
    return (model.to(device) if device else model), tokenizer


def load_seq_cls(spec: ModelConfig):
    """(one-output sequence-classification model, names of the weights newly initialised)."""
    return load_with_info(spec, "seq_cls", num_labels=1)


# --------------------------------------------------------------------------- rm train


def run_rm_train(cfg: RMConfig, on_step=None) -> Path:
    """Train a BT reward model; writes ``<output_dir>/model`` and ``<output_dir>/eval.json``."""
    out = Path(cfg.train.output_dir)
    if start_run(cfg, cfg.train) is not None:
        return out / "model"
    d = cfg.data
    rows, bad = read_pairs(d.train, d.split, d.on_bad, d.margin_field)
    if d.test:
        test_rows, bad_test = read_pairs(d.test, d.split, d.on_bad, d.margin_field)
        bad += bad_test
    else:
        rows, test_rows = split_held_out(rows, d.eval_fraction, cfg.train.seed)

    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(cfg.train.seed)  # the new score head's initialisation
    new_pad = []
    model, missing = load_trainable(cfg.train, cfg.model, "seq_cls",
                                    lambda m: new_pad.append(ensure_pad_token(m, tokenizer)), num_labels=1)
    if missing:
        print(f"rm: new reward head {', '.join(missing)} initialised (seed {cfg.train.seed})")
    if new_pad[0]:
        print(
            f"rm: pad token set to {PAD_TOKEN!r} (id {tokenizer.pad_token_id}, distinct from EOS); "
            f"vocabulary {len(tokenizer)}"
        )
    train_cache = tokenize_rm_pairs(cfg, tokenizer, rows, "train")
    test_cache = tokenize_rm_pairs(cfg, tokenizer, test_rows, "test") if test_rows else None
    if not len(train_cache):
        raise UserError(f"{d.train}: no pair left to train on")
    train_set = _with_rows(train_cache, rows)
    test_set = _with_rows(test_cache, test_rows) if test_cache is not None else []
    caches = [c for c in (train_cache, test_cache) if c is not None]
    stats = {
        "train_pairs": len(train_set),
        "held_out_pairs": len(test_set),
        "truncated": sum(int(c.field("truncated").sum()) for c in caches),
        "skipped_long": sum(c.skipped for c in caches),
        "skipped_invalid": dict(bad),
    }
    print(
        f"rm: {len(train_set)} training pairs, {len(test_set)} held out; truncated "
        f"{stats['truncated']}, skipped {stats['skipped_long']} over-long"
        + (f", skipped invalid: {fmt_counts(bad)}" if bad else "")
    )

    pad = tokenizer.pad_token_id
    shared = d.share_prompt and shares_prompt(model, tokenizer)
    print("rm: " + ("one row per pair, prompt shared" if shared else "two rows per pair"))

    def collate(batch_rows: list[list[int]]) -> dict:
        items = [train_set[i] for row in batch_rows for i in row]  # (by tokens: several pairs a row)
        batch = collate_pairs([tok for _, tok in items], pad, shared, [len(row) for row in batch_rows])
        if d.margin_field:
            batch["margin"] = torch.tensor([row.margin for row, _ in items])
        return batch

    def evaluate(m) -> dict[str, float]:
        return evaluate_bt(m, test_set, pad, cfg.eval_batch_size) if test_set else {}

    sizes = train_cache.lengths().sum(1)  # tokens of a pair's two sequences: len(tok)
    data = TrainData((sizes - train_cache.field("prefix") if shared else sizes).tolist(), collate, by_tokens=True)

    def finish(record: dict) -> None:
        result = {**stats, **{k[5:]: v for k, v in record.items() if k.startswith("eval/")}}
        write_eval(out, result, "rm", len(test_set))

    train(model, tokenizer, data, bt_objective, cfg.train, cfg.optim, run_config=cfg,
          evaluate=evaluate, on_step=on_step, finish=finish)
    return out / "model"


def tokenize_rm_pairs(cfg: RMConfig, tokenizer, rows: list[PairRow], part: str) -> TokenCache:
    """The training (``part="train"``) or held-out pairs of ``rows`` as the reward model reads
    them (:func:`.encoding.encode_training_pair`), from the token cache or tokenized once into
    it; field ``row`` is each pair's index in ``rows``."""
    d = cfg.data
    source = d.test if part == "test" and d.test else d.train
    settings = {"part": part, "held_out": None if d.test else [d.eval_fraction, cfg.train.seed],
                "max_length": d.max_length, "max_prompt_length": d.max_prompt_length, "on_long": d.on_long,
                "on_bad": d.on_bad, "margin_field": d.margin_field}

    def encode(i: int, row: PairRow):
        tok = encode_training_pair(tokenizer, row, d)
        return None if tok is None else pair_example(tok, row=i)

    return tokenize_cached("rm", (source, d.split), settings, tokenizer, rows, encode, (*PAIR_FIELDS, "row"),
                           enabled=d.token_cache, progress=cfg.train.progress,
                           noun="training pairs" if part == "train" else "held-out pairs",
                           on_bad=d.on_bad, locate=lambda i: rows[i].where)


def _with_rows(cache: TokenCache, rows: list[PairRow]) -> Lazy:
    """The cached pairs as :func:`.encoding.tokenize_pairs` gives them: [(row, tokenized)]."""
    index = cache.field("row")
    return Lazy(len(cache), lambda i: (rows[int(index[i])], cache.pair(i)))


def write_eval(out: Path, result: dict, name: str, n_held_out: int) -> None:
    """Write ``eval.json`` of a trained judge and print its held-out accuracy per subset."""
    write_json(out / "eval.json", result)
    if n_held_out:
        print(
            f"{name}: held-out accuracy {result['accuracy']:.4f} on {n_held_out} pairs "
            + " ".join(f"{k[9:]}={v:.4f}" for k, v in result.items() if k.startswith("accuracy/"))
        )


def evaluate_bt(model, pairs: list[tuple[PairRow, TokenizedPair]], pad: int, batch_size: int = 32) -> dict:
    """A BT reward model's held-out loss and accuracy, overall and per subset (every rank
    scores its share)."""
    was_training = model.training
    model.eval()
    seqs = [tok.chosen for _, tok in pairs] + [tok.rejected for _, tok in pairs]
    r = torch.tensor(score_tokenized(model, seqs, pad, batch_size, shard=True), dtype=torch.float64)
    model.train(was_training)
    n = len(pairs)
    margins = torch.tensor([row.margin for row, _ in pairs], dtype=torch.float64)
    loss = bt_loss(r[:n], r[n:], margins).mean().item()
    return {"loss": loss, **held_out_accuracies([row.pair.subset for row, _ in pairs], (r[:n] - r[n:]).tolist())}
