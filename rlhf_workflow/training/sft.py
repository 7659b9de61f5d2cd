"""Supervised fine-tuning: next-token loss on assistant tokens only, sequences packed.

Paper defaults (RECIPE.md): lr 2e-5, cosine, warmup 0.05, 3 epochs, packed length 8192.
Packed sequences never see each other: each row carries a block-diagonal causal mask and
positions restarting at 0, and targets are shifted within each sequence. The conversations
are tokenized once into a cache on disk that later runs and resumes read
(:mod:`..data.token_cache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import Config, ModelConfig, OptimConfig, TrainConfig
from ..data.batching import collate_rows
from ..data.chat import IGNORE, Tokenized, tokenize_conversation
from ..data.pairs import CHARS_PER_TOKEN
from ..data.readers import read_records
from ..data.records import SFTExample
from ..data.token_cache import Lazy, TokenCache, locate_record, tokenize_cached
from ..errors import UserError
from ..models.loading import load_tokenizer, pad_id
from ..models.logprobs import token_logps
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
    token_cache: bool = Field(
        True, description="tokenize once, sharded over the ranks, into a cache on disk ($RLHF_TOKEN_CACHE, "
        "default ~/.cache/rlhf-workflow/tokens) that later runs and resumes read; false: every rank "
        "tokenizes everything on every run")


class SFTConfig(Config):
    model: ModelConfig = ModelConfig(path="meta-llama/Meta-Llama-3-8B")
    data: SFTDataConfig = SFTDataConfig()
    optim: OptimConfig = OptimConfig(lr=2e-5, warmup_ratio=0.05)
    train: TrainConfig = TrainConfig(output_dir="runs/sft", epochs=3, global_batch_size=128, micro_batch_size=8)


def tokenize_example(tokenizer, example: SFTExample, max_length: int, train_on: str) -> Tokenized | None:
    """One conversation truncated to ``max_length`` tokens (its last token then predicts
    nothing: its next token was cut off), or None when no assistant token is left to predict.
    Each text is cut to ``max_length x CHARS_PER_TOKEN`` characters first, which holds more
    than ``max_length`` tokens (a record of megabytes costs no more than a long one)."""
    limit = max_length * CHARS_PER_TOKEN
    messages = [{"role": m.role, "content": m.content[:limit]} for m in example.messages]
    tok = tokenize_conversation(tokenizer, messages, train_on)
    tok = Tokenized(tok.input_ids[:max_length], tok.loss_mask[:max_length])
    return tok if any(tok.loss_mask[1:]) else None


def tokenize_sft(tokenizer, examples: list[SFTExample], max_length: int, train_on: str):
    """(input_ids, targets) per example, truncated to ``max_length``; examples left with no
    assistant token after truncation are dropped and counted."""
    toks = [tokenize_example(tokenizer, ex, max_length, train_on) for ex in examples]
    return [(t.input_ids, t.targets()) for t in toks if t is not None], sum(t is None for t in toks)


def tokenize_cached_sft(cfg: SFTConfig, tokenizer) -> TokenCache:
    """The conversations of ``data.train`` tokenized (:func:`tokenize_example`), from the token
    cache or tokenized once into it; the records are read only when they must be tokenized."""
    d = cfg.data

    def encode(i: int, example: SFTExample):
        tok = tokenize_example(tokenizer, example, d.max_length, d.train_on)
        return None if tok is None else ((tok,), {})

    settings = {"max_length": d.max_length, "train_on": d.train_on, "on_bad": d.on_bad}
    return tokenize_cached("sft", (d.train, d.split), settings, tokenizer,
                           lambda: read_records(d.train, SFTExample, d.split, d.on_bad), encode,
                           enabled=d.token_cache, progress=cfg.train.progress, noun="conversations",
                           on_bad=d.on_bad, locate=locate_record(d.train, SFTExample, d.split, d.on_bad))


def sft_objective(model, batch: dict) -> StepOutput:
    return StepOutput(-token_logps(model, batch).sum(), {})


def run_sft(cfg: SFTConfig, on_step=None) -> Path:
    out = Path(cfg.train.output_dir)
    if start_run(cfg, cfg.train) is not None:
        return out / "model"
    tokenizer = load_tokenizer(cfg.model)
    cache = tokenize_cached_sft(cfg, tokenizer)
    if not len(cache):
        raise UserError(f"{cfg.data.train}: no example keeps an assistant token within max_length")
    print(f"sft: {len(cache)} conversations ({cache.skipped} dropped: no assistant token within "
          f"max_length {cfg.data.max_length})")

    def example(i: int) -> tuple[list[int], list[int]]:
        tok = cache.tokenized(i)
        return tok.input_ids, tok.targets()

    seqs = Lazy(len(cache), example)  # (input_ids, targets) as tokenize_sft gives them
    pad = pad_id(tokenizer)

    def collate(rows: list[list[int]]) -> dict:
        batch = collate_rows([[seqs[i] for i in row] for row in rows], pad)
        batch["num_items"] = int((batch["targets"] != IGNORE).sum())
        batch["num_tokens"] = int((batch["seq_ids"] > 0).sum())
        return batch

    lengths = cache.lengths()[:, 0].tolist()
    data = TrainData(lengths, collate, cfg.data.max_length if cfg.data.packing else 0)
    model, _ = load_trainable(cfg.train, cfg.model)
    train(model, tokenizer, data, sft_objective, cfg.train, cfg.optim, on_step=on_step,
          run_config=cfg)
    return out / "model"

