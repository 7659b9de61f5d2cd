"""More, smaller iterations at a fixed sample budget (docs/preregistration.md, "Eighth"): per
seed and judge, the demo's loop on the same 600 prompts in 3 iterations of 200 and in 12 of 50
(n = 8 each), and the final gold difference 12 x 50 minus 3 x 200, paired by prompt.

    python experiments/iteration_size.py [--seeds 3,4,5,6,7] [--judges gold,dpo] [--root runs/iteration-size]

Writes ``ROOT/iteration_size.json`` (per run and the reading per judge) and prints it."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from online_vs_trl import _loop_config, ours  # noqa: E402

from rlhf_workflow.evaluation.policy import paired_difference  # noqa: E402

ARMS = (3, 12)


def final_golds(root: Path, seed: int, judge: str, iterations: int) -> list[list[float]]:
    out = Path(_loop_config(root, seed, judge, iterations).out)
    return [json.loads(x)["gold"] for x in (out / f"iter_{iterations}" / "eval_gold.jsonl").read_text().splitlines()]


def reading(diffs: list[float]) -> dict:
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    se = sd / math.sqrt(len(diffs))
    positive = sum(d > 0 for d in diffs)
    verdict = ("confirmed" if mean > 2 * se and positive >= len(diffs) - 1 else
               "refuted" if mean < -2 * se else "not shown")
    return {"mean": mean, "sd": sd, "se": se, "positive": positive, "seeds": len(diffs), "verdict": verdict}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="3,4,5,6,7")
    p.add_argument("--judges", default="gold,dpo")
    p.add_argument("--root", default="runs/iteration-size")
    args = p.parse_args()
    root, seeds, judges = Path(args.root), [int(s) for s in args.seeds.split(",")], args.judges.split(",")
    runs = {}
    for seed in seeds:
        for judge in judges:
            arms = {k: ours(root, seed, judge, k) for k in ARMS}
            d = paired_difference(*(final_golds(root, seed, judge, k) for k in reversed(ARMS)))
            runs[f"seed_{seed}/{judge}"] = {
                "sft_gold": arms[3]["sft_gold"], "diff": d["diff"], "diff_se": d["se"],
                **{f"{k}x": {x: arms[k]["points"][-1][x] for x in ("gold", "kl", "train_s")} for k in ARMS}}
            r = runs[f"seed_{seed}/{judge}"]
            print(f"seed {seed} judge {judge}: SFT {r['sft_gold']:.3f}; final gold 3x200 {r['3x']['gold']:.3f}, "
                  f"12x50 {r['12x']['gold']:.3f}; 12x50 - 3x200 {d['diff']:+.3f} +- {d['se']:.3f}", flush=True)
            (root / "iteration_size.json").write_text(json.dumps({"runs": runs}, indent=1))
    summary = {j: reading([runs[f"seed_{s}/{j}"]["diff"] for s in seeds]) for j in judges} if len(seeds) > 1 else {}
    (root / "iteration_size.json").write_text(json.dumps({"runs": runs, "reading": summary}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
