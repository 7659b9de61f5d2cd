"""`rlhf dpo` versus TRL's DPOTrainer: same model, pairs, batch, max length, epochs, lr, dtype.

    python benchmarks/dpo_vs_trl.py [--pairs 256] [--epochs 2] [--sizes small,large] [--repeats 1]

For each model size (``small``: ~4M parameters, ``large``: ~30M) a random tiny Llama is
built with ``init_model``, and each framework trains it in a fresh subprocess (so peak RSS
is its own) on the same sandbox preference pairs: sigmoid DPO, beta 0.1, reference = the
starting model, AdamW (0.9, 0.999), cosine with warmup 0.03, 2 epochs (the paper's), fp32,
8 pairs per micro-batch x 2 accumulation, max length 256. Two times are taken per run: *compute*, the reference
log-probs plus the training steps (ours: one reference pass before training, then the loop;
TRL: ``trainer.train()`` with ``precompute_ref_log_probs=True``, its fastest configuration that
runs here: one reference pass at the start, inside ``train()``; ``--trl-live-reference``: a
reference forward every step, TRL's default), and
*end to end*, everything a user waits for (loading, tokenizing, saving too). pairs/s =
pairs x epochs / time. Afterwards both final models are scored by the same code: their mean
DPO loss on all pairs.

FLOP/s: the work each framework executes on real (unpadded) tokens, over its compute time,
against the machine's bf16 (and fp32) matmul peak measured by one large matmul. Ours:
6 x params x tokens per epoch (forward + backward) plus 2 x params x tokens once (the
reference pass), where tokens are those of the shared-prompt rows (each pair's prompt once;
``--ours data.share_prompt=false``: prompt twice). TRL: 6 + 2 x params x tokens per epoch
(its reference forward every step; 6 + 2 / epochs with the precomputed reference), prompt twice.
Ours by tokens (``--ours train.micro_batch_tokens=2048``): the same pairs per step, several
shared-prompt pairs packed into one row. FLOP/s thus measures how well each
uses the hardware; pairs/s measures what a user gets.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688),
    "large": dict(hidden_size=512, num_layers=10, num_heads=8, num_kv_heads=4, intermediate_size=1376),
}
MICRO, ACCUM, MAX_LEN, LR, BETA = 8, 2, 256, 1e-4, 0.1
EPOCHS = 2


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


# --------------------------------------------------------------------------- workers


def run_ours(model: str, pairs: str, out: str, extra: list[str]) -> dict:
    from rlhf_workflow.config import load_config
    from rlhf_workflow.training.dpo import DPOConfig, run_dpo

    cfg = load_config(DPOConfig, None, [
        f"model.path={model}", f"data.train={pairs}", f"data.max_length={MAX_LEN}",
        f"optim.lr={LR}", "optim.betas=[0.9,0.999]", "optim.warmup_ratio=0.03", f"loss.beta={BETA}",
        f"train.epochs={EPOCHS}", f"train.micro_batch_size={MICRO}", f"train.global_batch_size={MICRO * ACCUM}",
        f"train.output_dir={out}", "train.progress=false", "train.log_every=1", *extra,
    ])
    from rlhf_workflow.training import dpo, reference

    compute = []

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                compute.append(time.perf_counter() - t0)
        return wrapper

    dpo.train = timed(dpo.train)
    reference.compute_reference_logps = timed(reference.compute_reference_logps)
    t = time.perf_counter()
    run_dpo(cfg)
    wall = time.perf_counter() - t
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "compute_s": sum(compute), "train_losses": [r["loss"] for r in lines],
            "model": str(Path(out) / "model")}


def run_trl(model: str, pairs: str, out: str, extra: list[str], live_reference: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in Path(pairs).read_text().splitlines()]
    data = Dataset.from_list([{
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    } for r in rows])
    args = DPOConfig(
        output_dir=out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        max_length=MAX_LEN, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03,
        num_train_epochs=EPOCHS, beta=BETA, loss_type=["sigmoid"], adam_beta2=0.999, weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=42, bf16=False, dataloader_num_workers=0,
        precompute_ref_log_probs=not live_reference, precompute_ref_batch_size=32,
        gradient_checkpointing=False,  # TRL defaults to recomputing activations; ours does not
    )
    t = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(model))
    t0 = time.perf_counter()
    trainer.train()
    compute = time.perf_counter() - t0
    trainer.save_model(str(Path(out) / "model"))
    wall = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"wall_s": wall, "compute_s": compute, "train_losses": losses, "model": str(Path(out) / "model")}


def final_loss(policy: str, reference: str, pairs: str) -> float:
    """Mean sigmoid-DPO loss of ``policy`` on all pairs, scored by this project's code."""
    from rlhf_workflow.config import ModelConfig
    from rlhf_workflow.data.pairs import tokenize_pair
    from rlhf_workflow.data.readers import read_records
    from rlhf_workflow.data.records import PreferencePair
    from rlhf_workflow.losses import dpo_sigmoid_loss
    from rlhf_workflow.models.loading import load_model, load_tokenizer
    from rlhf_workflow.training.reference import compute_reference_logps, in_batches

    tok = load_tokenizer(ModelConfig(path=reference))
    tp = [tokenize_pair(tok, r, MAX_LEN, 1000) for r in read_records(pairs, PreferencePair)]
    lp = {p: compute_reference_logps(load_model(ModelConfig(path=p)), tp, tok.pad_token_id, in_batches(len(tp), 32),
                                     progress=False) for p in (policy, reference)}
    losses, _, _ = dpo_sigmoid_loss(lp[policy][:, 0], lp[policy][:, 1], lp[reference][:, 0],
                                    lp[reference][:, 1], BETA)
    return losses.mean().item()


def worker(args) -> None:
    res = run_ours(args.model, args.data, args.out, args.ours) if args.worker == "ours" else \
        run_trl(args.model, args.data, args.out, args.ours, args.trl_live_reference)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["final_loss"] = final_loss(res["model"], args.model, args.data)
    print("RESULT " + json.dumps(res))


# --------------------------------------------------------------------------- driver


def token_stats(model: str, pairs: str) -> tuple[int, int, int]:
    """(parameters without the input embedding, real tokens of chosen + rejected, real tokens
    of the shared-prompt rows)."""
    from rlhf_workflow.config import ModelConfig
    from rlhf_workflow.data.pairs import tokenize_pair
    from rlhf_workflow.data.readers import read_records
    from rlhf_workflow.data.records import PreferencePair
    from rlhf_workflow.models.loading import load_model, load_tokenizer

    m = load_model(ModelConfig(path=model))
    params = sum(p.numel() for p in m.parameters()) - m.get_input_embeddings().weight.numel()
    tok = load_tokenizer(ModelConfig(path=model))
    tokenized = [tokenize_pair(tok, r, MAX_LEN, 1000) for r in read_records(pairs, PreferencePair)]
    return params, sum(len(p) for p in tokenized), sum(p.shared_len() for p in tokenized)


def spawn(kind: str, model: str, pairs: str, out: str, epochs: int, extra: list[str], live: bool) -> dict:
    return run_worker(__file__, "--worker", kind, "--model", model, "--data", pairs, "--out", out, "--epochs",
                      str(epochs), *(f"--ours={o}" for o in extra), *(["--trl-live-reference"] if live else []))


def run_worker(script: str, *args: str) -> dict:
    """Run ``script *args`` in a fresh process (its peak memory its own); the dict of its RESULT line."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    global EPOCHS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=256, help="preference pairs (from the sandbox)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--repeats", type=int, default=1, help="runs per framework; the fastest counts")
    p.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `rlhf dpo` option for our side, e.g. data.share_prompt=false (repeatable)")
    p.add_argument("--trl-live-reference", action="store_true",
                   help="TRL runs its reference forward every step (its default) instead of precomputing")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    EPOCHS = args.epochs
    if args.worker:
        return worker(args)

    from rlhf_workflow.io import write_jsonl
    from rlhf_workflow.models.tiny import InitModelConfig, init_model
    from rlhf_workflow.sandbox import make_preferences

    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"threads {torch.get_num_threads()}; matmul peak: bf16 {peak_bf16 / 1e9:.1f} GFLOP/s, "
          f"fp32 {peak_fp32 / 1e9:.1f} GFLOP/s")
    root = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    pairs = root / "pairs.jsonl"
    write_jsonl(pairs, make_preferences(args.pairs, seed=1))
    rows = []
    for size in args.sizes.split(","):
        model = str(init_model(InitModelConfig(out=str(root / size), **SIZES[size])))
        params, tokens, shared_tokens = token_stats(model, str(pairs))
        ours_tokens = tokens if "data.share_prompt=false" in args.ours else shared_tokens
        trl_passes = 8 * EPOCHS if args.trl_live_reference else 6 * EPOCHS + 2
        executed = {"ours": (6 * EPOCHS + 2) * params * ours_tokens, "trl": trl_passes * params * tokens}
        best: dict[str, dict] = {}
        for r in range(args.repeats):
            for kind in ("ours", "trl"):
                res = spawn(kind, model, str(pairs), str(root / f"{size}-{kind}-{r}"), EPOCHS,
                            args.ours, args.trl_live_reference)
                if kind not in best or res["compute_s"] < best[kind]["compute_s"]:
                    best[kind] = res
        for kind, res in best.items():
            res["pairs_per_s"] = args.pairs * EPOCHS / res["compute_s"]
            res["pairs_per_s_end_to_end"] = args.pairs * EPOCHS / res["wall_s"]
            res["flops"] = executed[kind] / res["compute_s"]
        ratio = best["ours"]["pairs_per_s"] / best["trl"]["pairs_per_s"]
        print(f"\n{size}: {params / 1e6:.1f}M params (without input embedding), {args.pairs} pairs, "
              f"{tokens} tokens ({ours_tokens} in our rows), batch {MICRO}x{ACCUM}, max length {MAX_LEN}, fp32, {EPOCHS} epochs")
        print(f"{'':6} {'compute s':>9} {'pairs/s':>8} {'wall s':>7} {'pairs/s e2e':>11} "
              f"{'peak RSS MB':>11} {'GFLOP/s':>8} {'% bf16':>6} {'% fp32':>6} {'final loss':>10}")
        for kind, res in best.items():
            print(f"{kind:6} {res['compute_s']:9.1f} {res['pairs_per_s']:8.2f} {res['wall_s']:7.1f} "
                  f"{res['pairs_per_s_end_to_end']:11.2f} {res['peak_rss_mb']:11.0f} "
                  f"{res['flops'] / 1e9:8.2f} {100 * res['flops'] / peak_bf16:6.1f} "
                  f"{100 * res['flops'] / peak_fp32:6.1f} {res['final_loss']:10.4f}")
        print(f"throughput ratio ours / TRL: {ratio:.2f}x (end to end "
              f"{best['ours']['pairs_per_s_end_to_end'] / best['trl']['pairs_per_s_end_to_end']:.2f}x); "
              f"final losses differ by {abs(best['ours']['final_loss'] - best['trl']['final_loss']):.4f} "
              f"(log 2 = {math.log(2):.4f} at the start)")
        keep = ("compute_s", "wall_s", "pairs_per_s", "pairs_per_s_end_to_end", "peak_rss_mb", "flops",
                "final_loss", "train_losses")
        rows.append({"size": size, "params": params, "tokens": tokens, "ours_tokens": ours_tokens, "ratio": ratio,
                     **{k: {x: v[x] for x in keep} for k, v in best.items()}})
    print("\nJSON " + json.dumps({"peak_bf16": peak_bf16, "peak_fp32": peak_fp32, "epochs": EPOCHS,
                                  "pairs": args.pairs, "runs": rows}))


if __name__ == "__main__":
    main()
