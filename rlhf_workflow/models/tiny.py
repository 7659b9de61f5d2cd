"""Tiny models for tests and the demo, built the way a real 8B checkpoint is laid out.

A byte-level BPE tokenizer is trained locally with ``tokenizers``, a ``LlamaConfig`` or
``Qwen2Config`` is scaled down, and everything is written with ``save_pretrained`` (safetensors)
so the folder reloads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and vLLM, exactly like
a hub model. Nothing is downloaded.

Choices: the embedding and the LM head are *untied*, as in Llama-3-8B and Qwen2-7B, so the
tiny checkpoint has the same weight layout (a separate ``lm_head`` tensor) as the real ones.
With ``arch="qwen2"``, transformers 5 reloads the tokenizer as ``Qwen2Tokenizer``, which
replaces the saved pre-tokenizer with Qwen2's (same splits, digits single) and adds NFC: texts
that are not NFC-normalised then encode differently than with the tokenizer trained here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from ..config import Config
from ..errors import UserError
from ..io import replace_dir

Template = Literal["chatml", "llama3"]
Arch = Literal["llama", "qwen2"]

# Per template: special tokens (all never split), which of them is bos / eos / pad, and the
# jinja chat template. eos is the end of an assistant turn: what generation stops on.
TEMPLATES: dict[str, dict[str, Any]] = {
    "chatml": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|pad|>",
        "chat_template": (
            "{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
        ),
    },
    "llama3": {
        "specials": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|pad|>",
        ],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|pad|>",
        "chat_template": (
            "{{ bos_token }}"
            "{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
            " + message['content'] + '<|eot_id|>' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}"
            "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
            "{% endif %}"
        ),
    },
}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, template: Template = "chatml"
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (single digits, all 256 bytes) with chat special tokens."""
    spec = TEMPLATES[template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=spec["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so "A", "B" exist
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    named = {spec["bos"], spec["eos"], spec["pad"]}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        additional_special_tokens=[t for t in spec["specials"] if t not in named],
        chat_template=spec["chat_template"],
        model_max_length=2048,
        padding_side="right",
    )


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    arch: Arch = "llama",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 512,
) -> PretrainedConfig:
    """A scaled-down Llama / Qwen2 config whose vocabulary and special ids match ``tokenizer``."""
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )


class InitModelConfig(Config):
    """``rlhf init-model``: build a tiny random model + tokenizer for tests and the demo."""

    out: str = Field("runs/tiny-model", description="folder the model and tokenizer are saved to")
    arch: Arch = Field("llama", description="transformers architecture (llama or qwen2)")
    template: Template = Field("chatml", description="chat template and special tokens style")
    vocab_size: int = Field(1024, ge=300, description="BPE vocabulary size (incl. 256 bytes)")
    hidden_size: int = Field(128, ge=8, description="model width")
    num_layers: int = Field(2, ge=1, description="transformer blocks")
    num_heads: int = Field(4, ge=1, description="attention heads")
    num_kv_heads: int = Field(
        2, ge=1, description="key/value heads (grouped-query attention)"
    )
    intermediate_size: int = Field(384, ge=1, description="MLP hidden width")
    max_position_embeddings: int = Field(512, ge=16, description="longest sequence the model takes")
    seed: int = Field(0, description="seed of the weight initialisation")
    corpus: str | None = Field(
        None,
        description="tokenizer training text: .txt (one text a line) or .jsonl (all string "
        "values); default: the built-in sandbox corpus",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> InitModelConfig:
        for big, small in (("hidden_size", "num_heads"), ("num_heads", "num_kv_heads")):
            if getattr(self, big) % getattr(self, small):
                raise ValueError(f"{big} ({getattr(self, big)}) must be divisible by {small} ({getattr(self, small)})")
        return self


def read_corpus(path: str | Path) -> list[str]:
    """Texts of a .txt file (non-empty lines) or a .jsonl file (every string value)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"corpus file not found: {path}")
    texts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                texts.append(line.rstrip("\r\n"))
                continue
            try:
                texts.extend(_strings(json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not texts:
        raise UserError(f"corpus file has no text: {path}")
    return texts


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def init_model(cfg: InitModelConfig) -> Path:
    """Train the tokenizer, build a seeded random model, save both atomically to ``cfg.out``."""
    if cfg.corpus is not None:
        texts = read_corpus(cfg.corpus)
    else:
        from rlhf_workflow.sandbox import corpus

        texts = corpus()  # fixed corpus: the tokenizer does not depend on cfg.seed
    tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.template)
    config = tiny_config(
        tokenizer,
        cfg.arch,
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
        cfg.max_position_embeddings,
    )
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
