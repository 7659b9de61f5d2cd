"""`rlhf sft` versus TRL's SFTTrainer, both packing: same model, conversations, row length,
rows per step, epochs, lr, dtype.

    python benchmarks/sft_vs_trl.py [--conversations 2000] [--sizes small,large] [--repeats 1]

A random tiny Llama (``dpo_vs_trl.SIZES``) is trained by each framework in a fresh subprocess
on the same sandbox demonstrations, packed into rows of 512 tokens, 4 rows per micro-batch x 2
accumulation, 1 epoch, lr 1e-4, cosine, fp32. Ours packs first-fit into rows with a
block-diagonal mask; TRL packs best-fit-decreasing (``packing=True``, its default strategy)
and passes the sequences to the attention through their positions. *Compute* is the training
loop alone (ours: ``train``; TRL: ``trainer.train()``); tokens/s = the real tokens of the
conversations (this project's tokenization with the same chat template) x epochs / compute
time. Both final models are then scored by the same code: mean next-token loss on the
assistant tokens of all conversations.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from dpo_vs_trl import SIZES, run_worker

ROW, MICRO, ACCUM, LR = 512, 4, 2, 1e-4


def run_ours(model: str, data: str, out: str) -> dict:
    from rlhf_workflow.config import load_config
    from rlhf_workflow.training import sft

    cfg = load_config(sft.SFTConfig, None, [
        f"model.path={model}", f"data.train={data}", f"data.max_length={ROW}", "data.packing=true",
        f"optim.lr={LR}", "optim.warmup_ratio=0.03", "train.epochs=1", f"train.micro_batch_size={MICRO}",
        f"train.global_batch_size={MICRO * ACCUM}", f"train.output_dir={out}", "train.progress=false",
        "train.log_every=1000", "data.token_cache=false"])
    compute = []
    inner = sft.train

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            compute.append(time.perf_counter() - t0)

    sft.train = timed
    t = time.perf_counter()
    path = sft.run_sft(cfg)
    return {"wall_s": time.perf_counter() - t, "compute_s": compute[0], "model": str(path)}


def run_trl(model: str, data: str, out: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [{"messages": json.loads(x)["messages"]} for x in Path(data).read_text().splitlines()]
    args = SFTConfig(
        output_dir=out, per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM, max_length=ROW,
        packing=True, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=1,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=1000, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=42, bf16=False, dataloader_num_workers=0, assistant_only_loss=False,
        gradient_checkpointing=False,  # TRL defaults to recomputing activations; ours does not
    )
    t = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model))
    t0 = time.perf_counter()
    trainer.train()
    compute = time.perf_counter() - t0
    trainer.save_model(str(Path(out) / "model"))
    return {"wall_s": time.perf_counter() - t, "compute_s": compute, "model": str(Path(out) / "model")}


def assistant_loss(model_path: str, tokenizer_path: str, data: str) -> tuple[float, int]:
    """(mean next-token loss on the assistant tokens of ``data``, their number of real tokens)."""
    import torch

    from rlhf_workflow.config import ModelConfig
    from rlhf_workflow.data.batching import collate_rows
    from rlhf_workflow.data.readers import read_records
    from rlhf_workflow.data.records import SFTExample
    from rlhf_workflow.models.loading import load_model, load_tokenizer
    from rlhf_workflow.models.logprobs import token_logps
    from rlhf_workflow.training.sft import tokenize_sft

    tok = load_tokenizer(ModelConfig(path=tokenizer_path))
    model = load_model(ModelConfig(path=model_path)).eval()
    seqs, _ = tokenize_sft(tok, read_records(data, SFTExample), ROW, "last")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), 64):
            batch = collate_rows([[s] for s in seqs[i : i + 64]], tok.pad_token_id)
            total -= float(token_logps(model, batch).sum())
            count += int((batch["targets"] != -100).sum())
    return total / count, sum(len(ids) for ids, _ in seqs)


def worker(args) -> None:
    res = (run_ours if args.worker == "ours" else run_trl)(args.model, args.data, args.out)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["final_loss"], res["tokens"] = assistant_loss(res["model"], args.model, args.data)
    print("RESULT " + json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=2000, help="sandbox demonstrations")
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--repeats", type=int, default=1, help="runs per framework; the fastest counts")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from rlhf_workflow.io import write_jsonl
    from rlhf_workflow.models.tiny import InitModelConfig, init_model
    from rlhf_workflow.sandbox import make_sft

    root = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    data = root / "sft.jsonl"
    write_jsonl(data, make_sft(args.conversations, seed=1))
    for size in args.sizes.split(","):
        model = str(init_model(InitModelConfig(out=str(root / size), **SIZES[size])))
        best: dict[str, dict] = {}
        for r in range(args.repeats):
            for kind in ("ours", "trl"):
                res = run_worker(__file__, "--worker", kind, "--model", model, "--data", str(data), "--out",
                                 str(root / f"{size}-{kind}-{r}"))
                if kind not in best or res["compute_s"] < best[kind]["compute_s"]:
                    best[kind] = res
        tokens = best["ours"]["tokens"]
        print(f"\n{size}: {args.conversations} conversations, {tokens} tokens, rows of {ROW}, "
              f"{MICRO} x {ACCUM} rows a step, 1 epoch, fp32")
        print(f"{'':6} {'compute s':>9} {'tokens/s':>9} {'wall s':>7} {'peak RSS MB':>11} {'final loss':>10}")
        for kind, res in best.items():
            print(f"{kind:6} {res['compute_s']:9.1f} {tokens / res['compute_s']:9.0f} {res['wall_s']:7.1f} "
                  f"{res['peak_rss_mb']:11.0f} {res['final_loss']:10.4f}")
        print(f"tokens/s ratio ours / TRL: {best['trl']['compute_s'] / best['ours']['compute_s']:.2f}x")


if __name__ == "__main__":
    main()
