"""The PM diagnosis of docs/preregistration.md ("why the PM is at chance on reasoning"): on the
pilot seed, PMs at each lr x epochs from the SFT model and from a 4-layer backbone (with a BT
model beside each backbone), each measured against gold only as a judge: held-out and training
accuracy per subset and skill, each order's accuracy, the position bias, the probability mass
on the two label tokens, and the truncated training comparisons.

    python experiments/pm_diagnosis.py runs/pilot-dpo-step      # seed 100; reuses the pilot's data and SFT

Writes ``OUT/pm_diagnosis.jsonl`` (one line per judge) and prints the table. A judge already in
the file is not trained again."""

from __future__ import annotations

import json
import sys
from itertools import islice
from pathlib import Path

import torch
from dpo_step_pilot import prepare

from rlhf_workflow.config import ModelConfig
from rlhf_workflow.data.readers import iter_rows, read_pairs
from rlhf_workflow.demo import DemoConfig, _gold_ordered, _stage
from rlhf_workflow.evaluation.judges import RMEvalConfig, run_rm_eval
from rlhf_workflow.io import write_jsonl
from rlhf_workflow.models.loading import pad_id
from rlhf_workflow.models.tiny import init_model
from rlhf_workflow.reward.bt import run_rm_train
from rlhf_workflow.reward.pm import (
    answer_logits,
    collate_comparisons,
    compare,
    encode_comparison,
    label_token_ids,
    load_preference_model,
    run_pm_train,
)
from rlhf_workflow.training.sft import run_sft

BUDGETS = [(3e-4, 1), (1e-3, 1), (3e-3, 1), (3e-4, 3), (1e-3, 3), (3e-3, 3)]
SKILLS = ("add", "compare", "reverse", "sort")


def main(out: Path) -> None:
    cfg = prepare(out)
    data = out / "data"
    held, train = out / "pm_diag" / "test_gold.jsonl", out / "pm_diag" / "train500_gold.jsonl"
    if not train.exists():
        write_jsonl(data / "train500.jsonl", (r for _, r in islice(iter_rows(data / "prefs_train.jsonl"), 500)))
        _gold_ordered(data / "prefs_test.jsonl", held, held.with_name("test_gold_skills.jsonl"))
        _gold_ordered(data / "train500.jsonl", train, train.with_name("train500_gold_skills.jsonl"))
    deep = _deep_backbone(cfg, out)
    results = out / "pm_diagnosis.jsonl"
    done = {r["name"] for r in _rows(results)}
    judges = [(f"PM lr {lr:g}, {ep} epochs", "pm", cfg.sft.train.output_dir, lr, ep) for lr, ep in BUDGETS]
    judges += [("BT (the demo's), 2 layers", "bt", cfg.sft.train.output_dir, cfg.rm.optim.lr, 1),
               ("PM (the demo's), 4 layers", "pm", deep, cfg.pm.optim.lr, 1),
               ("BT (the demo's), 4 layers", "bt", deep, cfg.rm.optim.lr, 1)]
    for name, kind, backbone, lr, epochs in judges:
        if name in done:
            continue
        folder = out / "pm_diag" / f"{kind}-{Path(backbone).name}-lr{lr:g}-ep{epochs}"
        row = {"name": name, "kind": kind, "lr": lr, "epochs": epochs,
               **_train_and_measure(cfg, kind, str(Path(backbone) / "model"), lr, epochs, folder, held, train)}
        results.open("a").write(json.dumps(row) + "\n")
    _print(_rows(results))


def _deep_backbone(cfg: DemoConfig, out: Path) -> str:
    """A 4-layer backbone (otherwise the demo's model), SFT-trained as the demo's SFT."""
    init = cfg.model.model_copy(update={"num_layers": 4, "out": str(out / "init-4l")})
    sft = cfg.sft.model_copy(deep=True)
    sft.model.path, sft.train.output_dir = init.out, str(out / "sft-4l")
    _stage("4-layer backbone", out / "init-4l" / "config.json", init_model, init)
    _stage("4-layer SFT", out / "sft-4l" / "model" / "config.json", run_sft, sft)
    return sft.train.output_dir


def _train_and_measure(cfg: DemoConfig, kind: str, backbone: str, lr: float, epochs: int, folder: Path,
                       held: Path, train: Path) -> dict:
    stage = (cfg.pm if kind == "pm" else cfg.rm).model_copy(deep=True)
    stage.model.path, stage.train.output_dir = backbone, str(folder)
    stage.optim.lr, stage.train.epochs = lr, epochs
    _stage(f"{kind} at lr {lr:g}, {epochs} epochs", folder / "model" / "config.json",
           run_pm_train if kind == "pm" else run_rm_train, stage)
    trained = json.loads((folder / "eval.json").read_text())
    out = {"truncated": trained.get("truncated")}
    for part, path in (("held_out", held), ("train", train)):
        if kind == "pm":
            out[part] = _pm_measure(folder / "model", path, stage.data.max_length)
        else:
            r = run_rm_eval(RMEvalConfig(model=ModelConfig(path=str(folder / "model")), input=str(
                path.with_name(path.stem + "_skills.jsonl")), out=str(folder / f"{part}_skills.json"),
                max_length=stage.data.max_length, progress=False))
            out[part] = {"per_skill": {s: v["accuracy"] for s, v in r["subsets"].items()}}
            out[part].update(_by_subset(out[part]["per_skill"], path))
    return out


def _pm_measure(model_dir: Path, pairs: Path, max_length: int) -> dict:
    """Against the gold order (chosen = gold's pick): accuracy per subset and skill (both orders
    averaged, the PM's inference), each order's own accuracy, mean P(A), and the mass of the
    answer position's softmax on the two label tokens."""
    model, tok = load_preference_model(str(model_dir))
    rows, _ = read_pairs(str(pairs))
    items = [(p, c[-1]["content"], r[-1]["content"]) for p, c, r in (row.pair.conversations() for row in rows)]
    got = compare(model, tok, items, 64, max_length)
    first, second = got.first[0::2], got.first[1::2]  # P(A) with chosen shown first / second
    skills = [f"{row.pair.subset}/{row.pair.meta['skill']}" for row in rows]
    per_skill = {s: _mean(p > 0.5 for p, k in zip(got.probs, skills, strict=True) if k == s)
                 for s in sorted(set(skills))}
    ids = list(label_token_ids(tok))
    mass = []
    with torch.no_grad():
        for i in range(0, 200, 50):
            seqs = [encode_comparison(tok, p, a, b, max_length)[0] for p, a, b in items[i : i + 50]]
            probs = answer_logits(model, collate_comparisons(seqs, pad_id(tok))).softmax(-1)
            mass += probs[:, ids].sum(-1).tolist()
    return {"per_skill": per_skill, **_by_subset(per_skill, pairs),
            "chosen_first_accuracy": _mean(p > 0.5 for p in first),
            "chosen_second_accuracy": _mean(p < 0.5 for p in second),
            "p_first": _mean(got.first), "label_mass": _mean(mass)}


def _by_subset(per_skill: dict, pairs: Path) -> dict:
    """Accuracy per subset, weighted by each skill's count in ``pairs``."""
    counts: dict[str, int] = {}
    for _, r in iter_rows(pairs):
        key = f"{r['subset']}/{r['meta']['skill']}"
        counts[key] = counts.get(key, 0) + 1
    out = {}
    for sub in ("chat", "reasoning"):
        keys = [k for k in per_skill if k.startswith(sub + "/")]
        out[sub] = sum(per_skill[k] * counts[k] for k in keys) / sum(counts[k] for k in keys)
    return out


def _print(rows: list[dict]) -> None:
    print("| judge | held-out chat / reasoning | reasoning per skill: " + " / ".join(SKILLS) +
          " | training chat / reasoning | chosen-first / chosen-second acc. | P(A) | label mass | truncated |")
    print("|---" * 7 + "|---|")
    for r in rows:
        h, t = r["held_out"], r["train"]
        skills = " / ".join(f"{h['per_skill'].get('reasoning/' + s, float('nan')):.2f}" for s in SKILLS)
        order = (f"{h['chosen_first_accuracy']:.3f} / {h['chosen_second_accuracy']:.3f}"
                 if "p_first" in h else "-")
        print(f"| {r['name']} | {h['chat']:.3f} / {h['reasoning']:.3f} | {skills} | {t['chat']:.3f} / "
              f"{t['reasoning']:.3f} | {order} | {h.get('p_first', float('nan')):.3f} | "
              f"{h.get('label_mass', float('nan')):.3f} | {r.get('truncated')} |")


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/pilot-dpo-step"))
