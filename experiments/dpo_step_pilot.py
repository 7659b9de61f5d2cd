"""The pilot grid of docs/preregistration.md ("a DPO step with power"): offline DPO as the demo
trains it, at each lr x epochs, judged by its implicit reward on the annotator's held-out
pairs (accuracy and loss against the annotator's labels) among the candidates whose policy
stays within 1 nat per response of SFT (KL on its own held-out samples, the amendment); no
gold number is read.

    python experiments/dpo_step_pilot.py runs/pilot-dpo-step      # seed 100, premise regime

Writes ``OUT/grid.jsonl`` (one line per candidate) and prints the table and the chosen one.
A candidate already in ``grid.jsonl`` is not run again."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rlhf_workflow.config import ModelConfig
from rlhf_workflow.demo import DemoConfig, _offline_dpo, _stage, _with_paths
from rlhf_workflow.evaluation.iteration import evaluate_iteration
from rlhf_workflow.evaluation.judges import RMEvalConfig, run_rm_eval
from rlhf_workflow.models.tiny import init_model
from rlhf_workflow.online.annotate import AnnotatorConfig
from rlhf_workflow.sandbox.generate import make_data
from rlhf_workflow.training.sft import run_sft

LRS = [2e-5, 1e-4, 3e-4, 1e-3, 3e-3]
EPOCHS = [1, 2, 4]
SEED = 100
KL_BUDGET = 1.0  # nats per response (the amendment)


def prepare(out: Path, **settings) -> DemoConfig:
    """The pilot seed's demo settings (``settings`` overriding), its data and SFT model."""
    cfg = _with_paths(DemoConfig(seed=SEED, out=str(out), **settings), out)
    _stage("sandbox data", out / "data" / "stats.json", make_data, cfg.data)
    _stage("tiny model", out / "init" / "config.json", init_model, cfg.model)
    _stage("SFT", out / "sft" / "model" / "config.json", run_sft, cfg.sft)
    return cfg


def main(out: Path) -> None:
    cfg = prepare(out)
    grid = out / "grid.jsonl"
    done = {(r["lr"], r["epochs"]) for r in _rows(grid)}
    candidates = [(lr, ep) for lr in LRS for ep in EPOCHS]
    for lr, epochs in candidates:
        if (lr, epochs) not in done:
            grid.open("a").write(json.dumps(_candidate(cfg, out, lr, epochs)) + "\n")
    rows = _rows(grid)
    best = _choose(rows)
    if best["lr"] == max(LRS) and (1e-2, best["epochs"]) not in {(r["lr"], r["epochs"]) for r in rows}:
        grid.open("a").write(json.dumps(_candidate(cfg, out, 1e-2, best["epochs"])) + "\n")  # the one extension
        rows = _rows(grid)
        best = _choose(rows)
    print("| lr | epochs | accuracy vs annotator | loss | chat | reasoning | KL to SFT | end-of-turn | DPO s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lr']:g} | {r['epochs']} | {r['accuracy']:.3f} | {r['loss']:.4f} | {r['chat']:.3f} | "
              f"{r['reasoning']:.3f} | {r['kl']:.2f} | {r['eos_rate']:.3f} | {r['seconds']:.0f} |")
    print(f"chosen: lr {best['lr']:g}, {best['epochs']} epochs")


def _candidate(cfg: DemoConfig, out: Path, lr: float, epochs: int) -> dict:
    """Offline DPO at (lr, epochs) and its implicit reward's held-out figures."""
    folder = out / f"dpo-lr{lr:g}-ep{epochs}"
    run = cfg.model_copy(deep=True)
    run.online.dpo.optim.lr, run.online.dpo.train.epochs = lr, epochs
    t = time.perf_counter()
    _offline_dpo(run, out / "data", folder)  # (writes folder/pairs.jsonl, folder/model)
    seconds = time.perf_counter() - t
    result = run_rm_eval(RMEvalConfig(
        model=ModelConfig(path=str(folder / "model")), reference=cfg.online.policy.path,
        beta=cfg.online.dpo.loss.resolved_beta, input=str(out / "data" / "prefs_test.jsonl"),
        out=str(folder / "eval.json"), max_length=cfg.online.dpo.data.max_length, progress=False))
    o = cfg.online  # the policy as a generator: KL to SFT on its own held-out samples (its gold is not kept)
    held = evaluate_iteration(str(folder / "model"), o.policy.path, o.policy, o.eval, AnnotatorConfig(kind="gold"),
                              seed=o.seed, iteration_dir=None)
    return {"lr": lr, "epochs": epochs, "accuracy": result["overall"], "loss": result["loss"],
            "chat": result["subsets"]["chat"]["accuracy"], "reasoning": result["subsets"]["reasoning"]["accuracy"],
            "kl": held["kl"], "eos_rate": held["eos_rate"], "seconds": seconds}


def _choose(rows: list[dict]) -> dict:
    """Among the candidates within the KL budget: the highest accuracy; among those within one
    binomial standard error of it (500 pairs), the lowest loss."""
    rows = [r for r in rows if r["kl"] <= KL_BUDGET]
    top = max(r["accuracy"] for r in rows)
    se = math.sqrt(top * (1 - top) / 500)
    return min((r for r in rows if r["accuracy"] >= top - se), key=lambda r: r["loss"])


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/pilot-dpo-step"))
