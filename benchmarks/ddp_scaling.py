"""Data-parallel scaling of the training loop: `rlhf dpo` on 1 process vs 2 DDP ranks.

    python benchmarks/ddp_scaling.py [--pairs 256] [--repeats 2]

The same DPO run (a ~30M-parameter tiny Llama, sandbox pairs, global batch 16, 2 epochs,
fp32) on one process with all the machine's threads, and under `torchrun --nproc_per_node 2`
(DDP over gloo) with the threads split between the ranks; the same global batch, so the same
updates. Reports training pairs/s (optimizer steps x global batch over the training loop's
own wall time, ``train_seconds``) and the ratio. On a 2-core CPU the ranks share the cores one thread each, so
the figure measures the loop's overhead under DDP (gradient all-reduce, equal micro-batches
per rank), not a speed-up; on GPUs each rank has its own device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    from rlhf_workflow.models.tiny import InitModelConfig, init_model
    from rlhf_workflow.sandbox import MakeDataConfig, make_data

    root = Path(tempfile.mkdtemp(prefix="ddp-scaling-"))
    make_data(MakeDataConfig(out=str(root / "data"), n_prefs=a.pairs, n_prefs_test=16, n_sft=16,
                             n_train_prompts=8, n_eval_prompts=8))
    init_model(InitModelConfig(out=str(root / "model"), hidden_size=512, num_layers=10, num_heads=8,
                               num_kv_heads=4, intermediate_size=1376))
    cores = os.cpu_count() or 2
    args = [f"model.path={root / 'model'}", f"data.train={root / 'data' / 'prefs_train.jsonl'}",
            "data.max_length=256", "optim.lr=1e-5", "train.epochs=2", "train.global_batch_size=16",
            "train.micro_batch_size=8", "train.progress=false", "train.log_every=1000"]
    best: dict[str, float] = {}
    for r in range(a.repeats):
        for name, world in (("1 process", 1), ("2 ranks (DDP)", 2)):
            out = root / f"run-{world}-{r}"
            launch = [sys.executable, "-m", "rlhf_workflow.cli"] if world == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                "-m", "rlhf_workflow.cli"]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // world))}
            t0 = time.perf_counter()
            subprocess.run([*launch, "dpo", *args, f"train.output_dir={out}"], env=env, check=True,
                           capture_output=True)
            wall = time.perf_counter() - t0
            result = json.loads((out / "train_result.json").read_text())
            assert result["processes"] == world
            pairs_s = result["optimizer_steps"] * result["global_batch_size"] / result["train_seconds"]
            best[name] = max(best.get(name, 0.0), pairs_s)
            print(f"{name}: {pairs_s:.1f} pairs/s in training ({result['train_seconds']:.0f}s), {wall:.0f}s end "
                  f"to end", flush=True)
    one, two = best["1 process"], best["2 ranks (DDP)"]
    print(f"best: 1 process {one:.1f} pairs/s, 2 ranks {two:.1f} pairs/s, ratio {two / one:.2f}x "
          f"({cores} cores)")


if __name__ == "__main__":
    main()
