#!/usr/bin/env bash
# Tokens/s and MFU of SFT, the BT reward model and DPO on one GPU, pair stages by pairs and by
# tokens, in one command on a machine with the package installed (about 6 minutes on an H100):
#   bash benchmarks/gpu_throughput.sh [OUT_DIR]   (not yet run on a GPU)
# A ~1B Llama built from a config (16 layers, hidden 2048, a 128,256-token vocabulary like
# Llama 3's; the sandbox tokenizer's ids use the first rows), bf16 compute on fp32 weights,
# FlexAttention (block masks for packed rows; ATTN=sdpa for the boolean-mask path). Each run
# trains a fixed number of steps; the table is the last metric line of each: tokens/s, MFU
# against PEAK_TFLOPS per GPU (default 989: an H100's dense bf16; empty: measured), peak memory.
# TINY=1: the same steps on a tiny model with SDPA, 2 steps each (a check of the script on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_throughput}
PY=${PYTHON:-python3}
R="$PY -m rlhf_workflow.cli"
if [ -n "${TINY:-}" ]; then
  ATTN=${ATTN:-sdpa}; STEPS=2; ROW=1024; PEAK=${PEAK_TFLOPS-}
  SIZE="hidden_size=64 num_layers=2 num_heads=4 num_kv_heads=2 intermediate_size=128"
else
  ATTN=${ATTN:-flex_attention}; STEPS=15; ROW=8192; PEAK=${PEAK_TFLOPS-989}
  SIZE="hidden_size=2048 num_layers=16 num_heads=16 num_kv_heads=8 intermediate_size=8192"
fi
COMMON="train.mixed_precision=bf16 train.progress=false train.save_minutes=0 train.log_every=1 \
  model.attn_implementation=$ATTN ${PEAK:+train.peak_tflops=$PEAK} train.max_steps=$STEPS"
mkdir -p "$OUT"
$R sandbox make-data out=$OUT/data n_sft=6000 n_prefs=6000 >/dev/null
$R init-model out=$OUT/init arch=llama $SIZE max_position_embeddings=8192 >/dev/null
$PY - "$OUT/init" <<'PY'  # Llama 3's vocabulary size: the head and the embedding as large as an 8B's
import sys
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
m.resize_token_embeddings(128256, mean_resizing=False)
m.save_pretrained(sys.argv[1])
PY
$R sft model.path=$OUT/init data.train=$OUT/data/sft.jsonl data.max_length=$ROW optim.lr=1e-4 \
    train.global_batch_size=8 train.micro_batch_size=1 train.output_dir=$OUT/sft $COMMON
for mode in pairs tokens; do
  SPLIT="train.micro_batch_size=16"; [ $mode = tokens ] && SPLIT="train.micro_batch_tokens=$ROW"
  $R rm train model.path=$OUT/init data.train=$OUT/data/prefs_train.jsonl data.test=$OUT/data/prefs_test.jsonl \
      data.max_length=512 optim.lr=1e-5 train.global_batch_size=128 train.eval_every=0 \
      $SPLIT train.output_dir=$OUT/rm_$mode $COMMON
  $R dpo model.path=$OUT/init data.train=$OUT/data/prefs_train.jsonl data.max_length=512 optim.lr=5e-7 \
      train.global_batch_size=128 $SPLIT train.output_dir=$OUT/dpo_$mode $COMMON
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["| run (1 GPU, bf16 compute, fp32 weights) | steps | last loss | tokens/s | MFU | peak GPU memory (GiB) |",
         "|---|---|---|---|---|---|"]
for d in sorted(p for p in out.iterdir() if (p / "metrics.jsonl").exists()):
    last = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    lines.append(f"| {d.name} | {last['step']} | {last['loss']:.4f} | {last['tokens_per_s']:.0f} | "
                 f"{last['mfu']:.1%} | {last.get('peak_memory_gib')} |")
text = "\n".join(lines) + "\n"
(out / "throughput.md").write_text(text)
print(text)
PY
