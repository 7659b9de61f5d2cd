"""``rlhf export-model``: any loadable model (a GGUF file included) as a plain safetensors folder.

A GGUF file (e.g. a llama.cpp checkpoint) is dequantized to ``model.dtype`` and written in the
Hugging Face layout: ``config.json`` without a ``quantization_config``, safetensors weights,
the tokenizer with its chat template, and the generation config. The folder then loads in
plain transformers (and vLLM) and is quicker to load than the GGUF, which is re-read and
dequantized on every load. Written atomically: a folder at ``out`` is complete.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..config import Config, ModelConfig, save_config
from ..errors import UserError
from .loading import load_model, load_tokenizer, save_model


class ExportModelConfig(Config):
    model: ModelConfig = ModelConfig(path="model.gguf")
    out: str = Field("runs/exported-model", description="folder to write the Hugging Face model to")
    overwrite: bool = Field(False, description="replace `out` if it exists")


def export_model(cfg: ExportModelConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} exists already (set overwrite=true to replace it)")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    save_model(model, tokenizer, out)
    save_config(cfg, out / "export_config.yaml")
    n = sum(p.numel() for p in model.parameters())
    print(f"export-model: {cfg.model.path} -> {out} ({n / 1e6:.1f}M parameters, {cfg.model.dtype}, "
          f"vocabulary {len(tokenizer)}, chat template: {'yes' if tokenizer.chat_template else 'no'})")
    return out
