"""Direct preference optimisation (and IPO, hinge, RPO, SimPO) on preference pairs.

Paper defaults (RECIPE.md, the DPO step of each online iteration): warm start from the
current policy, reference = the SFT model, sigmoid loss with beta 0.1, log-probs summed over
response tokens, lr 5e-7, cosine, warmup 0.03, 2 epochs, global batch 128, max length 2048.

How a step runs: the N pairs of a micro-batch go through the policy in one forward pass of
N rows, each holding its prompt once and then the chosen and the rejected response, which a
mask keeps from seeing each other (``data.share_prompt``; without it, or with flash
attention, 2N padded rows). Batches are length-grouped to cut padding.
The reference log-probs are not computed during training at all: one no-grad pass before
training writes them to a cache file keyed by the reference model and the tokenized pairs
(:mod:`.reference`), the reference model is then freed, and every epoch and every resumed
run reads the cache. With LoRA the reference is the base model (adapters disabled), so no
second copy of the weights is ever loaded. The resolved reference is in ``config.yaml``
and printed at start.
"""

from __future__ import annotations

import gc
import os
import shutil
from pathlib import Path

import torch
from accelerate import PartialState
from pydantic import Field, model_validator

from ..config import Config, ModelConfig, OptimConfig, TrainConfig, save_config
from ..data.chat import IGNORE
from ..data.pairs import TokenizedPair, collate_pairs, per_response, tokenize_pair
from ..data.readers import read_records
from ..data.records import PreferencePair
from ..errors import UserError
from ..losses import DPOLoss, dpo_loss, rpo_nll
from ..models.loading import load_model, load_tokenizer
from ..models.loading import save_model as save_hf_model
from . import reference as ref_cache
from .loop import Objective, StepOutput, TrainData, train


class DPODataConfig(Config):
    train: str = Field("runs/pairs.jsonl", description="preference pairs: .jsonl/.parquet file or hub dataset")
    split: str = Field("train", description="split, for hub datasets")
    max_length: int = Field(2048, ge=8, description="tokens of prompt + response, per sequence")
    max_prompt_length: int | None = Field(
        1000, ge=1, description="prompt tokens kept (from the end) when prompt + response is too long"
    )
    share_prompt: bool = Field(
        True, description="one row per pair: the prompt once, then chosen and rejected behind a mask "
        "(not with flash attention)"
    )


class DPOLossConfig(Config):
    loss: DPOLoss = Field(DPOLoss.SIGMOID, description="sigmoid (DPO), ipo, hinge (RSO/SLiC) or simpo")
    beta: float = Field(0.1, gt=0, description="KL strength beta (IPO's tau; SimPO's reward scale)")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="conservative DPO: assumed label-flip rate (sigmoid only)"
    )
    gamma: float = Field(1.0, ge=0, description="SimPO target reward margin (simpo only)")
    rpo_alpha: float = Field(0.0, ge=0, description="weight of RPO's per-token NLL on the chosen response")
    average_logps: bool | None = Field(
        None, description="average log-probs over response tokens (None: summed, but averaged for ipo/simpo)"
    )
    reference_batch_size: int = Field(16, ge=1, description="pairs per forward pass of the reference pass")
    reference_bf16: bool = Field(False, description="run the reference pass under bf16 autocast")

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> DPOLossConfig:
        if self.label_smoothing and self.loss is not DPOLoss.SIGMOID:
            raise ValueError(f"label_smoothing applies to the sigmoid loss only (loss is {self.loss.value})")
        return self


class LoRAConfig(Config):
    r: int = Field(0, ge=0, description="LoRA rank (0 = train all weights); needs the peft extra")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | str = Field("all-linear", description="module names to adapt, or all-linear")


class DPOConfig(Config):
    model: ModelConfig = ModelConfig(path="runs/sft/model")
    reference: str | None = Field(
        None, description="reference checkpoint (the online loop passes the SFT model); "
        "None = the starting policy itself (with LoRA: the base model)"
    )
    data: DPODataConfig = DPODataConfig()
    dpo: DPOLossConfig = DPOLossConfig()
    lora: LoRAConfig = LoRAConfig()
    optim: OptimConfig = OptimConfig(lr=5e-7, warmup_ratio=0.03)
    train: TrainConfig = TrainConfig(output_dir="runs/dpo", epochs=2, micro_batch_size=8, grad_accum=16)


def dpo_objective(cfg: DPOLossConfig) -> Objective:
    """Loss of a micro-batch of N pairs: one forward over 2N rows (chosen first)."""
    kind = cfg.loss
    average = kind.averages_logps if cfg.average_logps is None else cfg.average_logps

    def objective(model, batch: dict) -> StepOutput:
        sums = ref_cache.response_logps(model, batch)  # (2N,), one forward pass
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
        losses, rc, rr = dpo_loss(kind, chosen, rejected, ref_c, ref_r, cfg.beta,
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
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    kind = cfg.dpo.loss
    tokenizer = load_tokenizer(cfg.model)
    records = read_records(cfg.data.train, PreferencePair, cfg.data.split)
    pairs = [tokenize_pair(tokenizer, r, cfg.data.max_length, cfg.data.max_prompt_length, keep="start")
             for r in records]
    shared = cfg.data.share_prompt and not (cfg.model.attn_implementation or "").startswith("flash")
    print(f"dpo: {len(pairs)} pairs ({sum(p.truncated for p in pairs)} truncated to max_length "
          f"{cfg.data.max_length}), loss {kind.value}, beta {cfg.dpo.beta}, "
          + ("one row per pair (prompt shared)" if shared else "two rows per pair"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    policy = None
    ref = None
    if kind.needs_reference:
        ref, policy = reference_logps(cfg, pairs, pad_id, out, shared)
    elif cfg.reference is not None:
        print(f"dpo: loss {kind.value} is reference-free; reference {cfg.reference} is not used")
    if policy is None:
        policy = _load_policy(cfg)

    def collate(rows: list[list[int]]) -> dict:
        idx = [row[0] for row in rows]
        batch = collate_pairs([pairs[i] for i in idx], pad_id, shared)
        if ref is not None:
            batch["ref_logps"] = ref[idx]
        return batch

    lengths = [p.shared_len() if shared else max(len(p.chosen.input_ids), len(p.rejected.input_ids))
               for p in pairs]
    train(policy, tokenizer, TrainData(lengths, collate), dpo_objective(cfg.dpo), cfg.train,
          cfg.optim, on_step=on_step, run_config=cfg)
    if cfg.lora.r and PartialState().is_main_process:
        _merge_lora(policy, tokenizer, out)
    return out / "model"


def reference_logps(cfg: DPOConfig, pairs: list[TokenizedPair], pad_id: int, out: Path, shared: bool):
    """(ref log-probs (N, 2), the policy if it was loaded for the pass, else None).

    A reference that is the starting policy (``reference`` None or the same folder as
    ``model.path``) is computed with the policy itself before it trains (with LoRA: adapters
    disabled), so only one copy of the weights is ever loaded.
    """
    separate = cfg.reference is not None and not _same_path(cfg.reference, cfg.model.path)
    source = cfg.reference if separate else cfg.model.path
    bf16 = cfg.dpo.reference_bf16
    key = ref_cache.cache_key(ref_cache.model_identity(source), "bf16" if bf16 else cfg.model.dtype, pairs)
    path = ref_cache.cache_path(out, key)
    logps = ref_cache.load_cache(path, key, len(pairs))
    what = source + (" (the starting policy" + (", adapters disabled)" if cfg.lora.r else ")")
                     if not separate else "")
    if logps is not None:
        print(f"dpo: reference {what}: log-probs read from {path}")
        return logps, None
    state = PartialState()
    policy = None
    if state.is_main_process:
        print(f"dpo: reference {what}: computing log-probs of {len(pairs)} pairs once")
        if separate:
            model = load_model(cfg.model.model_copy(update={"path": cfg.reference}))
        else:
            model = policy = _load_policy(cfg)
        if model.get_input_embeddings().num_embeddings < max(
                max(p.chosen.input_ids + p.rejected.input_ids) for p in pairs) + 1:
            raise UserError(f"reference {source}: its vocabulary is smaller than the tokenizer's "
                            f"({cfg.model.tokenizer or cfg.model.path}); use a matching checkpoint")
        logps = ref_cache.compute_reference_logps(
            model.to(state.device), pairs, pad_id, cfg.dpo.reference_batch_size, bf16,
            cfg.train.progress, shared)
        ref_cache.save_cache(path, key, logps, source)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    state.wait_for_everyone()
    if logps is None:
        logps = ref_cache.load_cache(path, key, len(pairs))
    return logps, policy


def _same_path(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def _load_policy(cfg: DPOConfig):
    model = load_model(cfg.model)
    if not cfg.lora.r:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("lora.r > 0 needs the peft extra: pip install 'rlhf-workflow[peft]'") from None
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _merge_lora(policy, tokenizer, out: Path) -> None:
    """Keep the adapter in ``<out>/adapter`` and replace ``<out>/model`` by the merged model,
    so the next stage loads a plain checkpoint."""
    adapter = out / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    os.replace(out / "model", adapter)
    save_hf_model(policy.merge_and_unload(), tokenizer, out / "model")
