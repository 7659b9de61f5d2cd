#!/usr/bin/env bash
# The GPU training paths without vLLM, in one command, on a machine with the package installed:
#   bash benchmarks/gpu_train_check.sh [OUT_DIR]
# A ~0.5B model built from a config (sandbox tokenizer) is SFT-trained, then a BT reward model
# and DPO are trained from it, each under `single` and under FSDP2 (on every visible GPU), bf16
# compute with fp32 master weights, a fixed number of steps. Prints each run's throughput, peak
# GPU memory and whether every step had a finite loss and gradient (a non-finite one stops the
# run), plus the GPU-only tests. `benchmarks/gpu_smoke.sh` adds vLLM and a whole loop iteration.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_train_check}
PY=${PYTHON:-python3}
GPUS=$(nvidia-smi -L | wc -l)
R="$PY -m rlhf_workflow.cli"
DIST="$PY -m torch.distributed.run --standalone --nproc_per_node $GPUS -m rlhf_workflow.cli"
COMMON="train.mixed_precision=bf16 train.progress=false train.save_minutes=0"
mkdir -p "$OUT"
$PY -m pytest -q -p no:cacheprovider tests/training/test_gpu.py
$R sandbox make-data out=$OUT/data n_sft=4000 n_prefs=4000 >/dev/null
$R init-model out=$OUT/init arch=qwen2 vocab_size=4096 hidden_size=1536 num_layers=20 num_heads=12 \
    num_kv_heads=2 intermediate_size=4096 max_position_embeddings=1024 >/dev/null
for s in single fsdp; do
  L=$R; [ $s = fsdp ] && L=$DIST
  $L sft model.path=$OUT/init data.train=$OUT/data/sft.jsonl data.max_length=512 optim.lr=1e-4 \
      train.max_steps=30 train.global_batch_size=64 train.micro_batch_size=16 train.strategy=$s \
      train.output_dir=$OUT/sft_$s $COMMON
  $L rm train model.path=$OUT/sft_single/model data.train=$OUT/data/prefs_train.jsonl \
      data.test=$OUT/data/prefs_test.jsonl data.max_length=512 optim.lr=1e-5 train.max_steps=30 \
      train.global_batch_size=64 train.micro_batch_size=16 train.eval_every=0 train.strategy=$s \
      train.output_dir=$OUT/rm_$s $COMMON
  $L dpo model.path=$OUT/sft_single/model reference.path=$OUT/sft_single/model \
      data.train=$OUT/data/prefs_train.jsonl data.max_length=512 optim.lr=5e-7 train.max_steps=20 \
      train.global_batch_size=64 train.micro_batch_size=16 train.strategy=$s \
      train.output_dir=$OUT/dpo_$s $COMMON
done
$PY - "$OUT" "$GPUS" <<'PY'
import json, sys
from pathlib import Path
out, gpus = Path(sys.argv[1]), sys.argv[2]
lines = [f"| run ({gpus} GPU(s), bf16 compute, fp32 weights) | steps | last loss | tokens/s | peak GPU memory (GiB) |",
         "|---|---|---|---|---|"]
for d in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists()):
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    last = rows[-1]
    lines.append(f"| {d.name} | {last['step']} | {last['loss']:.4f} | {last.get('tokens_per_s')} | "
                 f"{last.get('peak_memory_gib')} |")
text = "\n".join(lines) + "\n"
(out / "check.md").write_text(text)
print(text)
PY
