"""Supervised fine-tuning: next-token loss on assistant tokens only, sequences packed.

Paper defaults (RECIPE.md): lr 2e-5, cosine, warmup 0.05, 3 epochs, packed length 8192.
Packed sequences never see each other: each row carries a block-diagonal causal mask and
positions restarting at 0, and targets are shifted within each sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import Config, ModelConfig, OptimConfig, TrainConfig
from ..data.batching import attention_mask, collate_rows
from ..data.chat import IGNORE, tokenize_conversation
from ..data.readers import read_records
from ..data.records import SFTExample
from ..errors import UserError
from ..models.loading import load_tokenizer, pad_id, param_dtype, uses_flash_attention
from ..models.logprobs import target_logps
from .checkpoints import start_run
from .engine import load_trainable
from .loop import StepOutput, TrainData, train


class SFTDataConfig(Config):
    train: str = Field("RLHFlow/RLHFlow-SFT-Dataset-ver2", description="SFT data: .jsonl/.parquet file or hub dataset")
    split: str = Field("train", description="split, for hub datasets")
    max_length: int = Field(8192, ge=8, description="tokens per packed row (or per sequence)")
    packing: bool = Field(True, description="pack several conversations into one row")
    train_on: Literal["all", "last"] = Field("all", description="assistant turns that carry loss")
    on_bad: Literal["error", "skip"] = Field(
        "error", description="invalid record (missing, empty or whitespace-only fields, chosen == rejected, "
        "non-string content): fail, or skip and count")


class SFTConfig(Config):
    model: ModelConfig = ModelConfig(path="meta-llama/Meta-Llama-3-8B")
    data: SFTDataConfig = SFTDataConfig()
    optim: OptimConfig = OptimConfig(lr=2e-5, warmup_ratio=0.05)
    train: TrainConfig = TrainConfig(output_dir="runs/sft", epochs=3, global_batch_size=128, micro_batch_size=8)


def tokenize_sft(tokenizer, examples: list[SFTExample], max_length: int, train_on: str):
    """(input_ids, targets) per example, truncated to ``max_length``; examples left with no
    assistant token after truncation are dropped and counted."""
    seqs, dropped = [], 0
    for ex in examples:
        tok = tokenize_conversation(tokenizer, [m.model_dump() for m in ex.messages], train_on)
        ids, targets = tok.input_ids[:max_length], tok.targets()[:max_length]
        if targets and targets[-1] != IGNORE:
            targets[-1] = IGNORE  # its next token was cut off
        if all(t == IGNORE for t in targets):
            dropped += 1
            continue
        seqs.append((ids, targets))
    return seqs, dropped


def sft_objective(model, batch: dict) -> StepOutput:
    packed = bool(batch["packed"])
    mask = None if packed and uses_flash_attention(model) else attention_mask(
        batch["seq_ids"], packed, param_dtype(model)
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"]}
    return StepOutput(-target_logps(model, inputs, batch["targets"]).sum(), {})


def run_sft(cfg: SFTConfig, on_step=None) -> Path:
    out = Path(cfg.train.output_dir)
    if start_run(cfg, cfg.train) is not None:
        return out / "model"
    tokenizer = load_tokenizer(cfg.model)
    examples = read_records(cfg.data.train, SFTExample, cfg.data.split, cfg.data.on_bad)
    seqs, dropped = tokenize_sft(tokenizer, examples, cfg.data.max_length, cfg.data.train_on)
    if not seqs:
        raise UserError(f"{cfg.data.train}: no example keeps an assistant token within max_length")
    print(f"sft: {len(seqs)} conversations ({dropped} dropped: no assistant token within "
          f"max_length {cfg.data.max_length})")
    pad = pad_id(tokenizer)

    def collate(rows: list[list[int]]) -> dict:
        batch = collate_rows([[seqs[i] for i in row] for row in rows], pad)
        batch["num_items"] = int((batch["targets"] != IGNORE).sum())
        batch["num_tokens"] = int((batch["seq_ids"] > 0).sum())
        return batch

    lengths = [len(ids) for ids, _ in seqs]
    data = TrainData(lengths, collate, cfg.data.max_length if cfg.data.packing else 0)
    model, _ = load_trainable(cfg.train, cfg.model)
    train(model, tokenizer, data, sft_objective, cfg.train, cfg.optim, on_step=on_step,
          run_config=cfg)
    return out / "model"

