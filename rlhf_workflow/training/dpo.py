"""Direct preference optimisation (and IPO, hinge, RPO, SimPO) on preference pairs.

Paper defaults (RECIPE.md, the DPO step of each online iteration): warm start from the
current policy, reference = the SFT model, sigmoid loss with beta 0.1, log-probs summed over
response tokens, lr 5e-7, cosine, warmup 0.03, 2 epochs, global batch 128, max length 2048.

How a step runs: the N pairs of a micro-batch go through the policy in one forward pass of
N rows, each holding its prompt once and then the chosen and the rejected response, which a
mask keeps from seeing each other (``data.share_prompt``; without it, or with flash
attention, 2N padded rows). Batches are length-grouped to cut padding. The pairs are
tokenized once, shared out over the ranks, into a cache on disk that later runs and resumes
read (:mod:`..data.token_cache`).
The reference log-probs are not computed during training at all: one no-grad pass before
training over the very micro-batches of training's first epoch, each rank its own, in the
precision training computes in, writes them to a cache file keyed by the reference model,
the batching and the tokenized pairs
(:mod:`.reference`); the reference model is freed before the policy is loaded, and every
epoch and every resumed run reads the cache. With LoRA the reference is the base model (the
policy with its adapters off). The resolved reference is printed at start. With LoRA the
exported ``model/`` is merged and the adapter is kept in ``adapter/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..config import Config, ModelConfig, OptimConfig, PairLimits, TrainConfig
from ..data.chat import IGNORE
from ..data.pairs import collate_pairs, per_response, tokenize_pair
from ..data.readers import read_records
from ..data.records import PreferencePair
from ..data.token_cache import PAIR_FIELDS, TokenCache, locate_record, pair_example, tokenize_cached
from ..distributed import barrier
from ..errors import UserError
from ..faults import point
from ..losses import DPOLoss, dpo_loss, rpo_nll
from ..models.loading import load_model, load_tokenizer, pad_id
from ..models.logprobs import response_logps
from . import reference as ref_cache
from .checkpoints import start_run
from .engine import (
    free,
    inference_precision,
    load_frozen,
    load_trainable,
    resolve_precision,
    resolve_strategy,
    setup_for,
)
from .loop import Objective, StepOutput, TrainData, step_plan, train


class DPODataConfig(PairLimits):
    train: str = Field("runs/pairs.jsonl", description="preference pairs: .jsonl/.parquet file or hub dataset")
    split: str = Field("train", description="split, for hub datasets")
    share_prompt: bool = Field(
        True, description="one row per pair: the prompt once, then chosen and rejected behind a mask "
        "(not with flash attention)"
    )
    on_bad: Literal["error", "skip"] = Field(
        "error", description="invalid record (missing, empty or whitespace-only fields, chosen == rejected, "
        "non-string content): fail, or skip and count")


class LossConfig(Config):
    kind: DPOLoss = Field(DPOLoss.SIGMOID, description="sigmoid (DPO), ipo, hinge (RSO/SLiC) or simpo")
    beta: float | None = Field(
        None, gt=0, description="KL strength beta (IPO's tau; SimPO's reward scale); None: 0.1, for simpo 2.0")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="conservative DPO: assumed label-flip rate (sigmoid only)"
    )
    gamma: float = Field(1.0, ge=0, description="SimPO target reward margin (simpo only)")
    rpo_alpha: float = Field(0.0, ge=0, description="weight of RPO's per-token NLL on the chosen response")
    average_logps: bool | None = Field(
        None, description="average log-probs over response tokens (None: summed, but averaged for ipo/simpo)"
    )

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> LossConfig:
        if self.label_smoothing and self.kind is not DPOLoss.SIGMOID:
            raise ValueError(f"label_smoothing applies to the sigmoid loss only (kind is {self.kind.value})")
        return self

    @property
    def resolved_beta(self) -> float:
        return self.kind.default_beta if self.beta is None else self.beta


class ReferenceConfig(Config):
    path: str | None = Field(
        None, description="reference checkpoint (the online loop sets it: the SFT model or the previous "
        "policy); None = the starting policy itself (with LoRA: the base model)")


class LoRAConfig(Config):
    r: int = Field(0, ge=0, description="LoRA rank (0 = train all weights); needs the peft extra")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | str = Field("all-linear", description="module names to adapt, or all-linear")


class DPOConfig(Config):
    model: ModelConfig = ModelConfig(path="runs/sft/model")
    reference: ReferenceConfig = ReferenceConfig()
    data: DPODataConfig = DPODataConfig()
    loss: LossConfig = LossConfig()
    lora: LoRAConfig = LoRAConfig()
    optim: OptimConfig = OptimConfig(lr=5e-7, warmup_ratio=0.03)
    train: TrainConfig = TrainConfig(output_dir="runs/dpo", epochs=2, global_batch_size=128, micro_batch_size=8)


def dpo_objective(cfg: LossConfig) -> Objective:
    """Loss of a micro-batch of N pairs: one forward over 2N rows (chosen first)."""
    kind = cfg.kind
    average = kind.averages_logps if cfg.average_logps is None else cfg.average_logps

    def objective(model, batch: dict) -> StepOutput:
        sums = response_logps(model, batch)  # (2N,), one forward pass
        counts = per_response((batch["targets"] != IGNORE).float(), batch).clamp(min=1)
        avgs = sums / counts
        logps = avgs if average else sums
        chosen, rejected = logps.chunk(2)
        ref_c = ref_r = None
        if kind.needs_reference:
            ref = batch["ref_logps"]  # (N, 2), summed
            ref_c, ref_r = ref[:, 0], ref[:, 1]
            if average:
                ref_c, ref_r = ref_c / counts[: len(ref)], ref_r / counts[len(ref) :]
        losses, rc, rr = dpo_loss(kind, chosen, rejected, ref_c, ref_r, cfg.resolved_beta,
                                  cfg.label_smoothing, cfg.gamma)
        sum_c, sum_r = sums.detach().chunk(2)
        metrics = {
            "reward_acc": (rc > rr).float().sum(), "rewards/chosen": rc.sum(),
            "rewards/rejected": rr.sum(), "rewards/margin": (rc - rr).sum(),
            "logps/chosen": sum_c.sum(), "logps/rejected": sum_r.sum(),
        }
        if cfg.rpo_alpha:
            avg_c = avgs.chunk(2)[0]
            losses = losses + rpo_nll(avg_c, cfg.rpo_alpha)
            metrics["nll/chosen"] = -avg_c.detach().sum()
        return StepOutput(losses.sum(), metrics)

    return objective


def run_dpo(cfg: DPOConfig, on_step=None) -> Path:
    """Train, save to ``<output_dir>/model`` (a full model, LoRA merged) and return that path."""
    out = Path(cfg.train.output_dir)
    if start_run(cfg, cfg.train) is not None:
        return out / "model"
    kind = cfg.loss.kind
    tokenizer = load_tokenizer(cfg.model)
    cache = tokenize_dpo_pairs(cfg, tokenizer)
    pairs = cache.pairs()
    if not pairs:
        raise UserError(f"{cfg.data.train}: no pair fits in data.max_length={cfg.data.max_length} tokens")
    shared = cfg.data.share_prompt and not (cfg.model.attn_implementation or "").startswith("flash")
    print(f"dpo: {len(pairs)} pairs ({int(cache.field('truncated').sum())} with the prompt cut, {cache.skipped} "
          f"skipped: a response longer than max_length {cfg.data.max_length}), loss {kind.value}, beta "
          f"{cfg.loss.resolved_beta}, " + ("one row per pair (prompt shared)" if shared else "two rows per pair"))
    pad = pad_id(tokenizer)
    ref = policy = None

    def collate(rows: list[list[int]]) -> dict:
        idx = [i for row in rows for i in row]  # (by tokens: several pairs a row)
        batch = collate_pairs([pairs[i] for i in idx], pad, shared, [len(row) for row in rows])
        if ref is not None:
            batch["ref_logps"] = ref[idx]
        return batch

    sizes = cache.lengths()  # (N, 2) tokens of each chosen and rejected sequence
    lengths = sizes.sum(1) - cache.field("prefix") if shared else sizes.max(1)  # = p.shared_len() or the longer
    data = TrainData(lengths.tolist(), collate, by_tokens=True)
    if kind.needs_reference:
        ref, policy = reference_logps(cfg, cache, pad, out, shared, data)
    elif cfg.reference.path is not None:
        print(f"dpo: loss {kind.value} is reference-free; reference {cfg.reference.path} is not used")
    train(policy or _load_policy(cfg), tokenizer, data, dpo_objective(cfg.loss), cfg.train, cfg.optim,
          on_step=on_step, run_config=cfg)
    return out / "model"


def tokenize_dpo_pairs(cfg: DPOConfig, tokenizer) -> TokenCache:
    """The tokenized pairs of ``data.train``, from the token cache or tokenized once into it
    (:mod:`..data.token_cache`); the records are read only when they must be tokenized."""
    d = cfg.data
    locate = locate_record(d.train, PreferencePair, d.split, d.on_bad)

    def encode(i: int, pair: PreferencePair):
        tok = tokenize_pair(tokenizer, pair, d.max_length, d.max_prompt_length)
        if tok is None and d.on_long == "error":
            raise UserError(f"{locate(i)}: a response does not fit in data.max_length="
                            f"{d.max_length} tokens (responses are never cut; data.on_long=skip skips it)")
        return None if tok is None else pair_example(tok)

    settings = {"max_length": d.max_length, "max_prompt_length": d.max_prompt_length, "on_long": d.on_long,
                "on_bad": d.on_bad}
    return tokenize_cached("dpo", (d.train, d.split), settings, tokenizer,
                           lambda: read_records(d.train, PreferencePair, d.split, d.on_bad), encode,
                           PAIR_FIELDS, enabled=d.token_cache, progress=cfg.train.progress, noun="pairs",
                           on_bad=d.on_bad, locate=locate)


def reference_logps(cfg: DPOConfig, cache: TokenCache, pad: int, out: Path, shared: bool, data: TrainData):
    """(reference log-probs (N, 2), the policy if it was loaded for the pass, else None).

    Read from the cache, or computed once on the micro-batches of training's first epoch,
    each rank its own, in the precision training computes in (so the first loss is exactly
    log 2 when the reference is the starting policy, whatever the precision and batch size).
    The reference is ``reference.path``, or the starting policy
    (``reference`` None or the same folder as ``model.path``), which is then run by the
    policy itself before it trains (with LoRA: adapters disabled), so its weights are loaded
    once; unless training computes on bf16 copies of the weights (FSDP/ZeRO with bf16),
    which the pass then loads as such.
    """
    path = cfg.reference.path
    separate = path is not None and not _same_path(path, cfg.model.path)
    source = path if separate else cfg.model.path
    rank, world, device = setup_for(cfg.train)
    strategy = resolve_strategy(cfg.train.strategy, world)
    precision = resolve_precision(cfg.train.mixed_precision, device)
    load_dtype, autocast = inference_precision(strategy, precision, cfg.model.dtype)
    plan = step_plan(data, cfg.train, world)
    batching = f"{load_dtype}/autocast={autocast}/micro={plan.micro}x{plan.step_size}/seed={cfg.train.seed}/" \
               f"grouped={cfg.train.group_by_length}/tokens={plan.tokens}x{world}"  # the batches a pair is in
    pairs = cache.pairs()
    key = ref_cache.cache_key(ref_cache.model_identity(source), batching, cache.digest())
    path = ref_cache.cache_path(out, key)
    what = source + (" (the starting policy" + (", adapters disabled)" if cfg.lora.r else ")")
                     if not separate else "")
    logps = ref_cache.load_cache(path, key, len(pairs))
    if logps is not None:
        if rank == 0:
            print(f"dpo: reference {what}: log-probs read from {path}")
        return logps, None
    # the policy runs its own reference pass, unless training computes on other weights or ZeRO-3
    # partitions the policy as it loads (its forward works only inside DeepSpeed's engine)
    reuse = not separate and load_dtype == cfg.model.dtype and strategy != "zero3"
    sharded = world > 1 and strategy in ("fsdp", "zero3")
    if rank == 0:
        print(f"dpo: reference {what}: computing log-probs of {len(pairs)} pairs once, on {world} "
              f"process(es)" + (", sharded (FSDP2)" if sharded else ""))
    if reuse:
        model = _load_policy(cfg)
    else:  # sharded like the policy under FSDP2 and ZeRO-3, so that it fits where the policy trains
        model, _ = load_frozen(cfg.model.model_copy(update={"path": source, "dtype": load_dtype}), sharded,
                               precision)
    if model.get_input_embeddings().num_embeddings < int(cache.ids.max()) + 1:
        raise UserError(f"reference {source}: its vocabulary is smaller than the tokenizer's "
                        f"({cfg.model.tokenizer or cfg.model.path}); use a matching checkpoint")
    logps = ref_cache.compute_reference_logps(
        model.to(device), pairs, pad, plan.first_epoch(rank), autocast, cfg.train.progress, shared)
    point("reference")
    if rank == 0:
        ref_cache.save_cache(path, key, logps, source)
    barrier()
    if reuse:
        return logps, model
    free(model)
    return logps, None


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def _load_policy(cfg: DPOConfig):
    if not cfg.lora.r:
        return load_trainable(cfg.train, cfg.model)[0]
    model = load_model(cfg.model)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("lora.r > 0 needs the peft extra: pip install 'rlhf-workflow[peft]'") from None
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)
