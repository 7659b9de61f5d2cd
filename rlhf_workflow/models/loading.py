"""Load models and tokenizers from a local folder or a hub name; save them atomically.

Weights are saved as safetensors in the Hugging Face layout, so transformers and vLLM load
the result directly. ``trust_remote_code`` is off unless the config turns it on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.path
    _check_exists(name)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load tokenizer {name!r}: {_first_line(e)}") from None


def load_model(cfg: ModelConfig, head: str = "causal_lm", **kwargs):
    """A ``causal_lm`` or a one-output ``seq_cls`` model, in the configured dtype."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    _check_exists(cfg.path)
    extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    try:
        return cls.from_pretrained(
            cfg.path,
            dtype=DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            **extra,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model {cfg.path!r}: {_first_line(e)}") from None


def unwrap(model):
    """The model inside a distributed wrapper (DDP, DeepSpeed), or the model itself."""
    return getattr(model, "module", model)


def param_dtype(model) -> torch.dtype:
    """The dtype of the weights (additive attention masks are built in it)."""
    return next(model.parameters()).dtype


def uses_flash_attention(model) -> bool:
    """Flash attention takes no 4-D masks: packed rows rely on positions alone there."""
    return (unwrap(model).config._attn_implementation or "").startswith("flash")


def save_model(model, tokenizer, out: str | Path) -> Path:
    """Save model and tokenizer into ``out`` via a temporary sibling folder and a rename."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def _check_exists(name: str) -> None:
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local and not Path(name).expanduser().exists():
        raise UserError(f"model path not found: {name}")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
