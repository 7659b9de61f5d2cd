"""``rlhf generate``: n responses per prompt from the current policy, checkpointed in chunks.

Prompts are streamed in chunks of ``chunk_size``; each finished chunk is written atomically
to ``<out>.parts/``, so a crash loses at most one chunk and a re-run continues. Under
``accelerate launch`` chunk i goes to process ``i % world_size`` (every prompt is generated
exactly once, however uneven the split) and the main process joins the parts in prompt
order. Each chunk samples with seed ``sampling.seed + i``, so the rollouts do not depend on
the number of processes.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import Config, ModelConfig, save_config
from ..data.readers import fmt_counts, iter_records
from ..data.records import Prompt
from ..distributed import barrier, device, setup
from ..errors import UserError
from ..generation.sampling import Sample, SamplingConfig
from ..manifest import write_manifest
from .chunks import chunks, count_records, join_parts, process_chunks, start_parts

Generator = Callable[[list[list[dict]], SamplingConfig], list[list[Sample]]]


class VLLMConfig(Config):
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="fraction of device memory vLLM may use")
    tensor_parallel_size: int = Field(1, ge=1, description="devices one engine spans")
    max_model_len: int | None = Field(None, description="context length of the engine (default: the model's)")
    enforce_eager: bool = Field(False, description="disable CUDA graphs (faster start, slower decode)")
    engines: int = Field(1, ge=0, description="engines, one per GPU, prompts sharded across them (0 = one per visible GPU)")


class GenerateConfig(Config):
    model: ModelConfig = ModelConfig(path="RLHFlow/LLaMA3-SFT")
    input: str = Field("prompts.jsonl", description="prompt records (JSONL/parquet/hub dataset)")
    out: str = Field("rollouts.jsonl", description="rollouts to write")
    backend: Literal["hf", "vllm"] = Field("hf", description="transformers (CPU/GPU) or vLLM")
    sampling: SamplingConfig = SamplingConfig(n=8, temperature=1.0, max_new_tokens=2048)
    chunk_size: int = Field(256, ge=1, description="prompts per checkpointed chunk")
    limit: int = Field(0, ge=0, description="only the first N prompts (0 = all)")
    on_bad: Literal["error", "skip"] = Field(
        "error", description="invalid record (missing, empty or whitespace-only prompt): fail, or skip and count")
    vllm: VLLMConfig = VLLMConfig()
    shard: str | None = Field(None, pattern=r"^\d+/\d+$", description="k/N: only chunks i with i % N == k (set for engine workers)")


def make_generator(cfg: GenerateConfig) -> Generator:
    """Load the policy once (on this process's device); return a function mapping prompts to samples."""
    if cfg.backend == "vllm":
        from ..generation.vllm import make_vllm_generator

        return make_vllm_generator(cfg.model, cfg.vllm)
    from ..generation.hf import generate_hf
    from ..models.loading import load_model, load_tokenizer

    model, tokenizer = load_model(cfg.model).to(device()), load_tokenizer(cfg.model)
    return lambda prompts, sampling: generate_hf(model, tokenizer, prompts, sampling, progress=False)


def rollout_records(prompts: list[Prompt], samples: list[list[Sample]]) -> list[dict]:
    out = []
    for p, group in zip(prompts, samples, strict=True):
        rec = {"id": p.id, "prompt": p.model_dump()["prompt"], "meta": p.meta,
               "responses": [s.text for s in group],
               "finish_reasons": [s.finish_reason for s in group],
               "num_tokens": [s.num_tokens for s in group]}
        out.append({k: v for k, v in rec.items() if v is not None})
    return out


def run_generate(cfg: GenerateConfig, generator: Generator | None = None) -> Path:
    out = Path(cfg.out)
    rank, world, _ = setup()
    if cfg.shard is None and not start_parts(out, cfg.model_dump(mode="json", exclude={"shard"}), rank):
        print(f"generate: {out} exists already")
        return out
    engines = (cfg.vllm.engines or _visible_gpus()) if cfg.backend == "vllm" else 1
    if rank == 0 and cfg.shard is None:
        save_config(cfg, out.with_suffix(".config.yaml"))
        write_manifest(out.parent, cfg, name=out.with_suffix(".manifest.json").name)
    skipped: Counter = Counter()
    if cfg.shard is None and engines > 1:
        _run_engines(cfg, engines, out.with_suffix(".config.yaml"))
        n_chunks, world = sum(1 for _ in chunks(_prompts(cfg, skipped), cfg.chunk_size)), engines
    else:
        if cfg.shard:
            rank, world = map(int, cfg.shard.split("/"))
        n_chunks = _generate_chunks(cfg, out, rank, world, generator, skipped)
        barrier()
        if cfg.shard:
            return out  # an engine worker: the launcher joins the parts
    if n_chunks == 0:
        raise UserError(f"{cfg.input}: no prompts to generate from"
                        + (f" ({fmt_counts(skipped)} skipped)" if skipped else ""))
    if rank == 0:
        join_parts(out, n_chunks)
        print(f"generate: {n_chunks} chunk(s) on {world} process(es), {cfg.sampling.n} responses per "
              f"prompt -> {out}" + (f"; skipped {fmt_counts(skipped)}" if skipped else ""))
    barrier()
    return out


def _prompts(cfg: GenerateConfig, skipped: Counter | None = None) -> Iterator[Prompt]:
    records = iter_records(cfg.input, Prompt, skipped=skipped if cfg.on_bad == "skip" else None)
    return islice(records, cfg.limit) if cfg.limit else records


def _generate_chunks(cfg, out: Path, rank: int, world: int, generator, skipped: Counter) -> int:
    loaded = [generator]

    def fn(i: int, batch: list[Prompt]) -> list[dict]:
        if loaded[0] is None:
            loaded[0] = make_generator(cfg)
        sampling = cfg.sampling.model_copy(update={"seed": cfg.sampling.seed + i})
        return rollout_records(batch, loaded[0]([p.messages() for p in batch], sampling))

    return process_chunks(_prompts(cfg, skipped), out, cfg.chunk_size, rank, world, fn, "generate",
                          _n_prompts(cfg))


def _n_prompts(cfg: GenerateConfig) -> int | None:
    """The prompt count for the progress bar, when a local file or ``limit`` tells it."""
    n = count_records(cfg.input)
    if cfg.limit:
        return cfg.limit if n is None else min(n, cfg.limit)
    return n


def _visible_gpus() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def _run_engines(cfg: GenerateConfig, engines: int, config_path: Path) -> None:
    """One worker process per GPU (CUDA_VISIBLE_DEVICES=k), each on chunks i % engines == k."""
    import subprocess
    import sys

    procs = []
    for k in range(engines):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(k)}
        cmd = [sys.executable, "-m", "rlhf_workflow.cli", "generate", "--config", str(config_path),
               f"shard={k}/{engines}"]
        procs.append(subprocess.Popen(cmd, env=env))
    failed = [k for k, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise RuntimeError(f"generate: engine worker(s) {failed} failed; re-run to continue")
