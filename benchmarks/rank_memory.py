"""Host memory per rank while a model is loaded, while a frozen reference runs its pass, and
while a DPO implicit judge (two models) scores responses: whole copies on one process, or each
rank's share on several (FSDP2: built on the meta device, each rank reading its own slices).

    python benchmarks/rank_memory.py MODEL_DIR OUT.json                         # one process
    torchrun --nproc_per_node 2 benchmarks/rank_memory.py MODEL_DIR OUT.json    # 2 ranks, sharded
    python benchmarks/rank_memory.py MODEL_DIR OUT.json --shard                 # FSDP2 on one rank
    torchrun ... benchmarks/rank_memory.py MODEL_DIR OUT.json --strategy zero3  # loaded by ZeRO-3's zero.Init

On a GPU each phase also reports its peak GPU memory (``*_gpu_mib``, allocated by PyTorch).

A thread samples the process's private memory (resident, not file-backed: a memory-mapped
checkpoint's pages are the node's shared page cache) every 2 ms; each phase reports its peak
growth over the memory before it (MiB), beside the model's fp32 size and the world size. Real
checkpoints are bf16 and train in fp32, so give a bf16 checkpoint: loading it converts every
weight, as an 8B run does (an fp32 file loaded as fp32 can stay memory-mapped). Each rank writes ``OUT.json`` with
its rank in the name (``OUT.rank1.json``); rank 0 writes ``OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from rlhf_workflow.config import ModelConfig, TrainConfig
from rlhf_workflow.data.pairs import tokenize_pair
from rlhf_workflow.data.records import PreferencePair
from rlhf_workflow.distributed import barrier, setup
from rlhf_workflow.models.loading import load_tokenizer, pad_id
from rlhf_workflow.reward.bt import load_reward_model, score
from rlhf_workflow.training.engine import free, load_frozen, load_trainable
from rlhf_workflow.training.loop import TrainData, step_plan
from rlhf_workflow.training.reference import compute_reference_logps

MIB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


def anon_bytes() -> int:
    """Private memory of this process (resident pages not backed by a file: weights, activations,
    copies). Pages of a memory-mapped checkpoint are left out: they are the page cache, shared by
    every rank of the node and given back under pressure."""
    resident, shared = (int(x) for x in Path("/proc/self/statm").read_text().split()[1:3])
    return (resident - shared) * PAGE


class Peak:
    """The peak private memory of this process while the block runs, sampled every 2 ms."""

    def __enter__(self):
        self.stop = threading.Event()
        self.before = self.peak = anon_bytes()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, anon_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, anon_bytes())

    @property
    def growth_mib(self) -> float:
        return round((self.peak - self.before) / MIB, 1)


@contextmanager
def gpu_peak(into: dict, key: str):
    """The peak GPU memory PyTorch allocated while the block runs, into ``into[key]`` (MiB)."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    yield
    torch.cuda.synchronize()
    into[key] = round((torch.cuda.max_memory_allocated() - before) / MIB, 1)


def pairs_of(tokenizer, n: int):
    prompts = [f"Please sort these numbers: {' '.join(str((7 * i + k) % 50) for k in range(8))}" for i in range(n)]
    return [tokenize_pair(tokenizer, PreferencePair(prompt=p, chosen="They are sorted now, thanks for asking.",
                                                    rejected="No."), 256) for p in prompts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--shard", action="store_true", help="FSDP2 even on one process")
    ap.add_argument("--strategy", default="fsdp", choices=["fsdp", "zero3"],
                    help="how a sharded training stage loads its model (zero3: deepspeed.zero.Init)")
    args = ap.parse_args()
    rank, world, device = setup(group_of_one=args.shard)
    sharded = args.shard or world > 1
    gpu: dict[str, float] = {}
    spec = ModelConfig(path=args.model)
    tok = load_tokenizer(spec)
    pairs = pairs_of(tok, args.pairs)
    result: dict = {"world": world, "rank": rank, "sharded": sharded, "strategy": args.strategy if sharded else "single"}
    barrier()
    with Peak() as load, gpu_peak(gpu, "load_gpu_mib"):  # what a training stage loads (FSDP2 when sharded)
        model, _ = load_trainable(TrainConfig(strategy=args.strategy if sharded else "single"), spec)
        model.to(device)
    result["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # (whole, sharded)
    free(model)
    del model
    barrier()
    with Peak() as ref, gpu_peak(gpu, "reference_gpu_mib"):  # a frozen model, one no-grad pass over the pairs
        model, _ = load_frozen(spec, sharded)
        plan = step_plan(TrainData([len(p) for p in pairs], collate=None), TrainConfig(
            global_batch_size=4 * world, micro_batch_size=4), world)
        compute_reference_logps(model, pairs, pad_id(tok), plan.first_epoch(rank), progress=False, shared=True)
        free(model)
        del model
    barrier()
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * 8
    with Peak() as judge, gpu_peak(gpu, "judge_gpu_mib"):  # the DPO implicit judge (two models) scoring 8
        model, jtok = load_reward_model(spec, reference=args.model, shard=sharded)
        score(model, jtok, prompts, [f"Answer: {i}" for i in range(8)], batch_size=4, progress=False)
        free(model)
        del model
    result.update(load_mib=load.growth_mib, reference_mib=ref.growth_mib, judge_mib=judge.growth_mib,
                  fp32_mib=round(4 * result["params"] / MIB, 1), **gpu)
    out = Path(args.out)
    if rank:
        out = out.with_name(f"{out.stem}.rank{rank}{out.suffix}")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    barrier()


if __name__ == "__main__":
    main()
