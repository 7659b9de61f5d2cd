"""Load models and tokenizers from a local folder, a hub name or a GGUF file; save them atomically.

Weights are saved as safetensors in the Hugging Face layout, so transformers and vLLM load
the result directly. ``trust_remote_code`` is off unless the config turns it on.

A ``path`` ending in ``.gguf`` (local, or ``org/name/FILE.gguf`` on the hub) is loaded by
transformers' GGUF reader and dequantized to the configured dtype; the model is then an
ordinary one (trainable, savable as safetensors). A local folder is checked before
transformers sees it, so a wrong path is one line saying what was expected and what is there.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..config import ModelConfig
from ..errors import UserError
from ..faults import point
from ..io import replace_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPECTED = "a Hugging Face model folder (config.json + *.safetensors weights), a .gguf file or a hub name"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def split_gguf(name: str) -> tuple[str, str | None]:
    """(folder or hub repository, GGUF file name or None) of a model path."""
    if name.lower().endswith(".gguf"):
        folder, _, file = name.rpartition("/")
        return folder or ".", file
    return name, None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.path
    source, gguf = split_gguf(name)
    _check_local(name, "tokenizer", "tokenizer" if cfg.tokenizer else "model")
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load tokenizer {name!r} (expected {EXPECTED}): {_one_line(e)}") from None


@dataclass(frozen=True)
class Loaded:
    tokenizer: Any
    config: Any  # transformers PretrainedConfig
    generation_config: Any


def load_parts(spec: ModelConfig) -> Loaded:
    """Tokenizer, model config and generation config of a model spec (no weights)."""
    from transformers import AutoConfig, GenerationConfig

    tokenizer = load_tokenizer(spec)
    source, gguf = split_gguf(spec.path)
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the config of {spec.path!r}: {e}") from None
    try:
        generation = GenerationConfig.from_pretrained(source, **extra)
    except (OSError, ValueError):
        generation = GenerationConfig.from_model_config(config)
    return Loaded(tokenizer, config, generation)


def load_model(cfg: ModelConfig, head: str = "causal_lm", **kwargs):
    """A ``causal_lm`` or a one-output ``seq_cls`` model, in the configured dtype."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    source, gguf = split_gguf(cfg.path)
    _check_local(cfg.path, "model")
    extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if gguf:
        extra["gguf_file"] = gguf
    else:
        extra["use_safetensors"] = True  # never unpickle weights
    try:
        loaded = cls.from_pretrained(
            source,
            dtype=DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            **extra,
            **kwargs,
        )
    except SafetensorError as e:
        raise UserError(f"{cfg.path}: a weight file is corrupt or truncated ({_one_line(e)}); copy or "
                        "download it again") from None
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model {cfg.path!r} (expected {EXPECTED}): {_one_line(e)}") from None
    if gguf:
        _as_plain_model(loaded[0] if isinstance(loaded, tuple) else loaded, cfg.path)
    return loaded


def load_with_info(cfg: ModelConfig, head: str = "causal_lm", **kwargs):
    """(model, names of the weights newly initialised, e.g. a new reward head), without
    transformers' load report (the caller says what is new)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        loaded = load_model(cfg, head, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
    return model, sorted(info.get("missing_keys", []))


def _as_plain_model(model, path: str) -> None:
    """A GGUF checkpoint's weights are dequantized on load, but transformers keeps its
    quantizer and ``quantization_config`` on the model and refuses to save it; drop both so the
    model trains and saves like any other."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = path  # (the GGUF's "general.name" otherwise)


def pad_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS (padding is masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def unwrap(model):
    """The model inside a distributed wrapper (DDP, DeepSpeed), or the model itself."""
    return getattr(model, "module", model)


def param_dtype(model) -> torch.dtype:
    """The dtype of the weights (additive attention masks are built in it)."""
    return next(model.parameters()).dtype


def uses_flash_attention(model) -> bool:
    """Flash attention takes no 4-D masks: packed rows rely on positions alone there."""
    return (unwrap(model).config._attn_implementation or "").startswith("flash")


def save_model(model, tokenizer, out: str | Path, state_dict: dict | None = None,
               dtype: str | None = None, max_shard_bytes: int | None = None) -> Path:
    """Save model and tokenizer into ``out`` via a temporary sibling folder and a rename.

    ``state_dict`` replaces the model's own weights; ``dtype`` converts floating-point weights
    (and the config's dtype) on the way out; ``max_shard_bytes`` caps a safetensors file."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if dtype is not None:
        state_dict = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
                      for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
        model.config.dtype = DTYPES[dtype]
    if state_dict is not None:
        state_dict = _without_tied_copies(model, state_dict)
    extra = {"max_shard_size": max_shard_bytes} if max_shard_bytes else {}
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict, **extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    point("export")
    replace_dir(tmp, out)
    return out


def _without_tied_copies(model, state_dict: dict) -> dict:
    """Drop the second name of a tied weight (``lm_head.weight`` of a tied embedding): gathered or
    converted weights no longer share storage, so ``save_pretrained`` would write both."""
    params = dict(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    for name, p in params.items():
        first.setdefault(id(p), name)
    return {k: v for k, v in state_dict.items() if k not in params or first[id(params[k])] == k}


def _check_local(name: str, what: str, label: str = "model") -> None:
    """A :class:`UserError` naming what was expected and what was found, for a local path that
    is not a loadable model (hub names are left to transformers)."""
    source, gguf = split_gguf(name)
    path = Path(name).expanduser()
    if not path.exists():
        if name.startswith((".", "/", "~")) or source.count("/") != 1:  # not an org/name on the hub
            raise UserError(f"{label} path not found: {name}")
        return
    if gguf:
        if not path.is_file():
            raise UserError(f"{name} is not a file; expected a .gguf file")
        return
    if not path.is_dir():
        raise UserError(f"{name} is a file; expected {EXPECTED}")
    files = sorted(f.name for f in path.iterdir())
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if "config.json" not in files and ggufs:
        raise UserError(
            f"{name} is a GGUF folder ({', '.join(ggufs)}), not a Hugging Face model folder: load a file "
            f"with model.gguf_file={ggufs[0]} (or model.path={name.rstrip('/')}/{ggufs[0]}), or convert it "
            f"once with `rlhf export-model model.path={name.rstrip('/')}/{ggufs[0]} out=DIR`")
    if what == "tokenizer" and not any(f in files for f in TOKENIZER_FILES):
        raise UserError(f"{name} holds no tokenizer: expected {' or '.join(TOKENIZER_FILES[:2])} "
                        f"(or a .gguf file, or a hub name); found {_listing(files)}")
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt")) and "training_args" not in f]
    if what == "model" and pickles and not any(f.endswith(".safetensors") for f in files):
        raise UserError(
            f"{name} holds only pickled weights ({', '.join(pickles[:3])}), which are not loaded: unpickling can "
            "run code. Convert them once, where you trust the file: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{name}').save_pretrained('{name}')\" (writes "
            "model.safetensors)")
    if what == "model" and ("config.json" not in files or not any(f.endswith(".safetensors") for f in files)):
        raise UserError(f"{name} is not a Hugging Face model folder: expected config.json and "
                        f"*.safetensors weights (or a .gguf file, or a hub name); found {_listing(files)}")


def _listing(files: list[str], limit: int = 8) -> str:
    if not files:
        return "an empty folder"
    more = f" and {len(files) - limit} more" if len(files) > limit else ""
    return ", ".join(files[:limit]) + more


def _one_line(e: Exception) -> str:
    """The whole message of a library exception on one line (its first line alone is often
    cut off mid-sentence)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__
