"""`rlhf rm train` versus TRL's RewardTrainer: same model, pairs, batch, epochs, lr, max length.

    python benchmarks/rm_vs_trl.py [--pairs 2000] [--batch 16] [--repeats 2]

A random tiny Llama (hidden 128, 2 layers, from ``init_model``) gets a one-output score head
and is trained by each framework in a fresh subprocess on the same sandbox preference pairs
(conversational format, the tiny model's chat template): BT loss, AdamW (0.9, 0.95), no
weight decay, clipping 1.0, cosine with warmup 0.03, 1 epoch, fp32, ``--batch`` pairs per
step, no gradient checkpointing (TRL's default turns it on; we turn it off so that both
compute the same thing), no checkpoints. Each framework keeps its own batching defaults:
ours groups pairs of similar length (``train.group_by_length=true``) and puts each pair in
one row with its prompt once (``data.share_prompt=true``), TRL's does neither. ``--ours
KEY=VALUE`` adds options to our side, e.g. ``--ours data.share_prompt=false`` to measure
without the shared prompt.

Reported per framework: training throughput in pairs/s over the optimizer steps after the
first (the loop alone, timed by a per-step callback in both), the end-to-end wall time
(loading, tokenizing, training, saving), and the held-out accuracy of the final model,
scored by the same code (``rlhf_workflow.reward.bt.score_tokenized``) on the same pairs.
The machine is shared, so the frameworks alternate and the best of ``--repeats`` runs counts;
both use ``--threads`` torch threads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LR, MAX_LEN, SEED = 1e-3, 256, 0


def _held_out_accuracy(model_dir: str, test: str) -> float:
    from rlhf_workflow.config import ModelConfig
    from rlhf_workflow.data.readers import read_pairs
    from rlhf_workflow.reward.bt import load_reward_model, score_tokenized
    from rlhf_workflow.reward.encoding import encode_pair

    model, tok = load_reward_model(ModelConfig(path=model_dir), "cpu")
    rows, _ = read_pairs(test)
    pairs = [encode_pair(tok, r.pair, MAX_LEN) for r in rows]
    r = score_tokenized(
        model, [p.chosen for p in pairs] + [p.rejected for p in pairs], tok.pad_token_id
    )
    n = len(pairs)
    return sum((c > j) + 0.5 * (c == j) for c, j in zip(r[:n], r[n:], strict=True)) / n


def run_ours(model: str, train: str, test: str, out: str, batch: int, extra: list[str]) -> dict:
    from rlhf_workflow.config import load_config
    from rlhf_workflow.reward.bt import RMConfig, run_rm_train

    cfg = load_config(
        RMConfig,
        None,
        [
            f"model.path={model}",
            f"data.train={train}",
            f"data.max_length={MAX_LEN}",
            "data.eval_fraction=0",
            f"optim.lr={LR}",
            "optim.warmup_ratio=0.03",
            f"train.global_batch_size={batch}",
            f"train.micro_batch_size={batch}",
            "train.epochs=1",
            f"train.output_dir={out}",
            "train.progress=false",
            "train.log_every=1000",
            f"train.seed={SEED}",
            *extra,
        ],
    )
    times: list[float] = []
    t0 = time.perf_counter()
    path = run_rm_train(cfg, on_step=lambda step, record: times.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    return {"steps": len(times), "loop_s": times[-1] - times[0], "wall_s": wall, "model": str(path)}


def run_trl(model: str, train: str, test: str, out: str, batch: int, extra: list[str]) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    rows = [json.loads(line) for line in Path(train).read_text().splitlines()]
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model)
    torch.manual_seed(SEED)
    net = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=1, dtype=torch.float32
    )
    args = RewardConfig(
        output_dir=out,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_length=MAX_LEN,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
        logging_steps=1000,
        disable_tqdm=True,
        seed=SEED,
        use_cpu=True,
    )
    trainer = RewardTrainer(
        model=net, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()]
    )
    trainer.train()
    trainer.save_model(f"{out}/model")
    tok.save_pretrained(f"{out}/model")
    wall = time.perf_counter() - t0
    return {
        "steps": len(times),
        "loop_s": times[-1] - times[0],
        "wall_s": wall,
        "model": f"{out}/model",
    }


WORKERS = {"ours": run_ours, "trl": run_trl}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads of each worker (same for both)"
    )
    p.add_argument(
        "--ours",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra `rlhf rm train` option for our side, e.g. data.share_prompt=false (repeatable)",
    )
    p.add_argument("--worker", choices=list(WORKERS))
    p.add_argument("--args", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:  # inside a subprocess: train once, print the result as JSON
        import torch

        torch.set_num_threads(a.threads)
        model, train, test, out = json.loads(a.args)
        res = WORKERS[a.worker](model, train, test, out, a.batch, a.ours)
        res["accuracy"] = _held_out_accuracy(res["model"], test)
        print("RESULT " + json.dumps(res))
        return

    from rlhf_workflow.models.tiny import InitModelConfig, init_model
    from rlhf_workflow.sandbox import MakeDataConfig, make_data

    work = Path(tempfile.mkdtemp(prefix="rm-bench-"))
    paths = make_data(
        MakeDataConfig(
            out=str(work / "data"),
            n_train_prompts=10,
            n_eval_prompts=10,
            n_sft=10,
            n_prefs=a.pairs,
            n_prefs_test=500,
        )
    )
    model = str(init_model(InitModelConfig(out=str(work / "model"), seed=SEED)))
    best: dict[str, dict] = {}
    for rep in range(a.repeats):
        for name in WORKERS:
            out = str(work / f"{name}-{rep}")
            args = json.dumps([model, str(paths["prefs_train"]), str(paths["prefs_test"]), out])
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    name,
                    "--batch",
                    str(a.batch),
                    "--threads",
                    str(a.threads),
                    "--args",
                    args,
                    *(f"--ours={o}" for o in a.ours),
                ],
                capture_output=True,
                text=True,
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[0][7:])
            res["pairs_per_s"] = a.batch * (res["steps"] - 1) / res["loop_s"]
            print(
                f"run {rep} {name:>4}: {res['pairs_per_s']:7.1f} pairs/s, "
                f"wall {res['wall_s']:5.1f}s, "
                f"held-out accuracy {res['accuracy']:.3f}",
                flush=True,
            )
            if name not in best or res["pairs_per_s"] > best[name]["pairs_per_s"]:
                best[name] = res
    print(
        f"\n{a.pairs} pairs, batch {a.batch}, 1 epoch, max length {MAX_LEN}, {a.threads} torch "
        f"thread(s), best of {a.repeats}"
    )
    print(f"{'':>6} {'pairs/s':>9} {'wall s':>8} {'held-out acc':>13}")
    for name, r in best.items():
        print(f"{name:>6} {r['pairs_per_s']:>9.1f} {r['wall_s']:>8.1f} {r['accuracy']:>13.3f}")
    print(f"speed-up (pairs/s): {best['ours']['pairs_per_s'] / best['trl']['pairs_per_s']:.2f}x")


if __name__ == "__main__":
    main()
