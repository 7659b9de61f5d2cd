"""``rlhf demo``: the workflow on the built-in sandbox, on a laptop CPU, resumable.

Stages so far: sandbox data -> tiny model + tokenizer -> SFT -> gold evaluation of the SFT
policy. Each stage writes its output under ``out`` and is skipped when that output exists,
so re-running the command continues a half-finished demo. Paths inside the stage sections
are set by the demo (under ``out``); every other option can be overridden, e.g.
``rlhf demo sft.optim.lr=1e-3``.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from .config import Config, ModelConfig, OptimConfig, TrainConfig, save_config
from .data.readers import read_records
from .data.records import Prompt
from .evaluation.policy import evaluate_policy, format_table
from .generation.hf import SamplingConfig
from .io import write_json
from .models.loading import load_model, load_tokenizer
from .models.tiny import InitModelConfig, init_model
from .sandbox import MakeDataConfig, make_data
from .training.sft import SFTConfig, SFTDataConfig, run_sft

SANDBOX_SFT = SFTConfig(
    model=ModelConfig(path="(set by the demo)"),
    data=SFTDataConfig(train="(set by the demo)", max_length=256),
    optim=OptimConfig(lr=3e-3, warmup_ratio=0.05),
    train=TrainConfig(output_dir="(set by the demo)", epochs=10, micro_batch_size=16, log_every=20),
)


class DemoConfig(Config):
    out: str = Field("runs/demo", description="run directory of the demo")
    seed: int = Field(0, description="seed of the data, the model initialisation and training")
    data: MakeDataConfig = MakeDataConfig()
    model: InitModelConfig = InitModelConfig()
    sft: SFTConfig = SANDBOX_SFT
    eval: SamplingConfig = Field(
        SamplingConfig(n=4, temperature=1.0, max_new_tokens=64, batch_size=100),
        description="sampling for the gold evaluation on held-out prompts",
    )


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _with_paths(cfg, out)
    save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()

    _stage("sandbox data", out / "data" / "stats.json", lambda: make_data(cfg.data))
    _stage("tiny model", out / "init" / "config.json", lambda: init_model(cfg.model))
    _stage("SFT", out / "sft" / "model" / "config.json", lambda: run_sft(cfg.sft))
    result_path = out / "eval" / "sft.json"
    _stage("gold evaluation", result_path, lambda: _evaluate(cfg, out / "sft" / "model", result_path))

    import json

    result = json.loads(result_path.read_text())
    print(f"\nSFT policy on {result['n']} held-out sandbox prompts (sampled at T={cfg.eval.temperature}):")
    print(format_table(result))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; everything is under {out}/")
    return result


def _with_paths(cfg: DemoConfig, out: Path) -> DemoConfig:
    cfg = cfg.model_copy(deep=True)
    cfg.data.out, cfg.data.seed = str(out / "data"), cfg.seed
    cfg.model.out, cfg.model.seed = str(out / "init"), cfg.seed
    cfg.sft.model.path = str(out / "init")
    cfg.sft.data.train = str(out / "data" / "sft.jsonl")
    cfg.sft.train.output_dir = str(out / "sft")
    cfg.sft.train.seed = cfg.seed
    return cfg


def _stage(name: str, done_marker: Path, fn) -> None:
    if done_marker.exists():
        print(f"[demo] {name}: done already ({done_marker})")
        return
    print(f"[demo] {name} ...")
    t = time.perf_counter()
    fn()
    print(f"[demo] {name}: finished in {time.perf_counter() - t:.0f}s")


def _evaluate(cfg: DemoConfig, model_dir: Path, path: Path) -> None:
    spec = ModelConfig(path=str(model_dir))
    prompts = read_records(Path(cfg.data.out) / "prompts_eval.jsonl", Prompt)
    result = evaluate_policy(load_model(spec), load_tokenizer(spec), prompts, cfg.eval)
    write_json(path, {"model": str(model_dir), **result})
