"""One online iteration's time as prompts x n grows, and memory as the prompt pool grows.

    python benchmarks/iteration_scaling.py [--sizes 16x4,32x4,64x4] [--pools 10000,100000,1000000]

Time: ``rlhf loop iterations=1`` on a random tiny Llama (``dpo_vs_trl.SIZES["small"]``) with the
sandbox gold reward as the annotator (no reward model to train first), for each prompts x n,
responses up to 24 tokens, no held-out evaluation; the seconds of each stage from the run's
``state.json``. Each run is a fresh process; its peak RSS is reported too. Memory: the prompts
stage alone (a seeded disjoint slice of 64 prompts streamed from the pool) on pools of growing
size, each in a fresh process: the peak of the Python allocations it makes (tracemalloc).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

from dpo_vs_trl import SIZES, run_worker


def loop_worker(root: Path, model: str, prompts: int, n: int) -> dict:
    from rlhf_workflow.config import load_config
    from rlhf_workflow.online.loop import LoopConfig, run_loop

    out = root / f"loop-{prompts}x{n}"
    cfg = load_config(LoopConfig, None, [
        f"out={out}", "iterations=1", f"policy.path={model}", f"prompts.source={root / 'pool.jsonl'}",
        f"prompts.per_iteration={prompts}", f"generate.sampling.n={n}", "generate.sampling.max_new_tokens=24",
        "generate.sampling.batch_size=16", "annotate.annotator.kind=gold", "dpo.data.max_length=128",
        "dpo.train.global_batch_size=8", "dpo.train.micro_batch_size=8", "dpo.train.progress=false"])
    run_loop(cfg)
    return json.loads((out / "state.json").read_text())["completed"]


def pool_worker(root: Path, size: int) -> dict:
    import tracemalloc

    from rlhf_workflow.config import load_config
    from rlhf_workflow.online.loop import LoopConfig, _check_pool, _slice_prompts

    cfg = load_config(LoopConfig, None, [f"prompts.source={root / f'pool-{size}.jsonl'}", "prompts.per_iteration=64",
                                         f"out={root / f'run-{size}'}"])
    tracemalloc.start()
    _slice_prompts(cfg, 1, root / f"slice-{size}.jsonl", _check_pool(cfg.prompts, Path(cfg.out)))
    return {"peak_mb": tracemalloc.get_traced_memory()[1] / 2**20}


def worker(args) -> None:
    root = Path(args.root)
    if args.worker == "loop":
        prompts, n = map(int, args.size.split("x"))
        res = {"seconds": loop_worker(root, args.model, prompts, n)}
    else:
        res = pool_worker(root, int(args.size))
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def spawn(root: Path, kind: str, size: str, model: str = "") -> dict:
    return run_worker(__file__, "--worker", kind, "--root", str(root), "--size", size, "--model", model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16x4,32x4,64x4", help="prompts x n of each iteration")
    p.add_argument("--pools", default="10000,100000,1000000", help="prompt pool sizes")
    for hidden in ("--worker", "--root", "--size", "--model"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from rlhf_workflow.io import write_jsonl
    from rlhf_workflow.models.tiny import InitModelConfig, init_model
    from rlhf_workflow.sandbox import make_prompts

    root = Path(tempfile.mkdtemp(prefix="iter-bench-"))
    model = str(init_model(InitModelConfig(out=str(root / "model"), **SIZES["small"])))
    largest = max(int(s.split("x")[0]) for s in args.sizes.split(","))
    write_jsonl(root / "pool.jsonl", make_prompts(largest, seed=5))
    print("| prompts x n | samples | generate s | annotate s | pairs s | DPO s | total s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        res = spawn(root, "loop", size, model)
        s = {k.split("/")[1]: v for k, v in res["seconds"].items() if k.startswith("iter_1/")}
        prompts, n = map(int, size.split("x"))
        print(f"| {size} | {prompts * n} | {s['generate']:.1f} | {s['annotate']:.1f} | {s['pairs']:.2f} | "
              f"{s['dpo']:.1f} | {sum(s.values()):.1f} | {res['peak_rss_mb']:.0f} |")
    print("\n| prompt pool | peak Python memory of the prompts stage (MB, tracemalloc) |")
    print("|---|---|")
    for size in args.pools.split(","):
        write_jsonl(root / f"pool-{size}.jsonl", ({"prompt": f"question {i}", "id": f"q{i}"} for i in range(int(size))))
        print(f"| {int(size):,} | {spawn(root, 'pool', size)['peak_mb']:.2f} |")


if __name__ == "__main__":
    main()
