"""The evaluation size of docs/preregistration.md ("a DPO step with power"): on the pilot seed,
the standard error of the paired gold difference (clustered by prompt) between the offline DPO
at the demo's DPO settings and SFT, at 200 held-out prompts x 4 samples, and the number of
prompts that brings it to at most 0.0067 (a third of the 0.02 gap the reading resolves).

    python experiments/eval_size.py runs/pilot-dpo-step      # seed 100; reuses the pilot's data and SFT

Writes ``OUT/eval_size.json`` and prints it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from dpo_step_pilot import prepare

from rlhf_workflow.demo import _offline_dpo, _stage
from rlhf_workflow.evaluation.iteration import evaluate_iteration
from rlhf_workflow.online.annotate import AnnotatorConfig

TARGET = 0.02 / 3


def main(out: Path) -> None:
    cfg = prepare(out)
    o = cfg.online
    folder = out / f"offline-lr{o.dpo.optim.lr:g}-ep{o.dpo.train.epochs:g}"
    _stage("offline DPO (the demo's settings)", folder / "model" / "config.json", _offline_dpo, cfg, out / "data",
           folder)
    gold = AnnotatorConfig(kind="gold")  # only the gold reward is read
    held_out = o.eval.model_copy(update={"kl": False})

    def evaluate(policy: Path, gold_out: Path, baseline: Path | None) -> dict:
        return evaluate_iteration(str(policy), o.policy.path, o.policy, held_out, gold, seed=o.seed,
                                  iteration_dir=None, paired=(str(gold_out), str(baseline) if baseline else None))

    sft_gold = out / "eval_size_sft_gold.jsonl"
    sft = evaluate(Path(o.policy.path), sft_gold, None)
    dpo = evaluate(folder / "model", out / "eval_size_dpo_gold.jsonl", sft_gold)
    prompts = sum(1 for _ in sft_gold.open())
    se = dpo["gold_vs_baseline_se"]
    needed = math.ceil(prompts * (se / TARGET) ** 2 / 100) * 100
    result = {"prompts": prompts, "samples": held_out.sampling.n, "dpo_settings": {
        "lr": o.dpo.optim.lr, "epochs": o.dpo.train.epochs}, "sft_gold": sft["gold_reward"],
        "sft_gold_se": sft["gold_reward_se"], "dpo_gold": dpo["gold_reward"], "dpo_gold_se": dpo["gold_reward_se"],
        "paired_diff": dpo["gold_vs_baseline"], "paired_se": se, "target_se": TARGET, "prompts_needed": needed}
    (out / "eval_size.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/pilot-dpo-step"))
