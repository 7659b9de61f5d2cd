#!/usr/bin/env bash
# The scale paths on one GPU (NCCL, FSDP2 on one rank), in one command, needing only the package:
#   bash benchmarks/gpu_scale_check.sh [OUT_DIR]          (about 5 minutes on one H100/H200)
# 1. Per phase, peak GPU memory and peak host memory of a 0.5B model (bf16 checkpoint, fp32
#    weights): loading it for training (built on the meta device, its shards read from the files),
#    a frozen reference's pass, the DPO implicit judge (two models) scoring
#    (benchmarks/rank_memory.py --shard), next to the same phases loaded whole.
# 2. The loop end to end with the transformers backend: SFT and a BT reward model (FSDP2), then
#    `rlhf loop` (one iteration: generate, annotate, pairs, DPO under FSDP2, evaluation), each
#    stage a process of its own. nvidia-smi is sampled every second meanwhile, so the memory
#    held between stages shows; the loop's own process must never initialise CUDA.
# Writes OUT_DIR/scale.md (and the raw files next to it). TINY=1 runs the same steps on a tiny
# model, on the CPU too, to check the script itself (its figures mean nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_scale_check}
PY=${PYTHON:-python3}
R="$PY -m rlhf_workflow.cli"
ONE="$PY -m torch.distributed.run --standalone --nproc_per_node 1 -m rlhf_workflow.cli"
COMMON="train.mixed_precision=bf16 train.progress=false train.save_minutes=0 train.strategy=fsdp"
mkdir -p "$OUT"
export MALLOC_MMAP_THRESHOLD_=65536  # freed host memory goes back to the system: honest peaks

$R sandbox make-data out=$OUT/data n_sft=2000 n_prefs=2000 n_train_prompts=64 n_eval_prompts=32 >/dev/null
if [ "${TINY:-0}" = 1 ]; then SIZE="hidden_size=64 num_layers=2 num_heads=4 num_kv_heads=2 intermediate_size=128"
else SIZE="hidden_size=1536 num_layers=20 num_heads=12 num_kv_heads=2 intermediate_size=4096"; fi
$R init-model out=$OUT/init arch=qwen2 vocab_size=4096 $SIZE max_position_embeddings=1024 >/dev/null
$PY - "$OUT/init" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1]).to(torch.bfloat16).save_pretrained(sys.argv[1])
PY

# 1. memory per phase: whole (one process) and FSDP2 (one rank, NCCL)
$PY benchmarks/rank_memory.py $OUT/init $OUT/memory_whole.json
$PY -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/rank_memory.py $OUT/init \
    $OUT/memory_fsdp.json --shard

# 2. the loop end to end, nvidia-smi sampled every second
SMI=0
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -l 1 > $OUT/gpu_memory.csv &
  SMI=$!
fi
trap '[ $SMI = 0 ] || kill $SMI 2>/dev/null || true' EXIT
$ONE sft model.path=$OUT/init data.train=$OUT/data/sft.jsonl data.max_length=512 optim.lr=1e-4 \
    train.max_steps=20 train.global_batch_size=32 train.micro_batch_size=16 train.output_dir=$OUT/sft $COMMON
$ONE rm train model.path=$OUT/sft/model data.train=$OUT/data/prefs_train.jsonl \
    data.test=$OUT/data/prefs_test.jsonl data.max_length=512 optim.lr=1e-5 train.max_steps=20 \
    train.global_batch_size=32 train.micro_batch_size=16 train.output_dir=$OUT/rm $COMMON
$PY - "$OUT" <<'PY' | tee $OUT/loop.log
import sys, time
from rlhf_workflow.config import load_config
from rlhf_workflow.online.loop import LoopConfig, run_loop
out = sys.argv[1]
cfg = load_config(LoopConfig, None, [
    f"out={out}/loop", "iterations=1", f"policy.path={out}/sft/model",
    f"prompts.source={out}/data/prompts_train.jsonl", "prompts.per_iteration=64",
    "generate.sampling.n=4", "generate.sampling.max_new_tokens=64", "generate.sampling.batch_size=64",
    f"annotate.annotator.path={out}/rm/model", "annotate.annotator.max_length=1024",
    "dpo.data.max_length=512", "dpo.optim.lr=5e-7",
    "dpo.train.epochs=1", "dpo.train.global_batch_size=16", "dpo.train.micro_batch_size=8",
    "dpo.train.strategy=fsdp", "dpo.train.mixed_precision=bf16", "dpo.train.progress=false",
    f"eval.prompts={out}/data/prompts_eval.jsonl", "eval.limit=32", "eval.sampling.n=2",
    "eval.sampling.max_new_tokens=64"])
t0 = time.time()
run_loop(cfg)
import torch
print(f"loop: {time.time() - t0:.0f} s; the loop's own process initialised CUDA: {torch.cuda.is_initialized()}")
PY
[ $SMI = 0 ] || kill $SMI 2>/dev/null || true

$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
whole, fsdp = (json.loads((out / f"memory_{k}.json").read_text()) for k in ("whole", "fsdp"))
lines = [f"## Memory per phase ({whole['params'] / 1e6:.0f}M parameters, bf16 checkpoint, fp32 weights; MiB)", "",
         "| phase | GPU, whole | GPU, FSDP2 (1 rank) | host, whole | host, FSDP2 |", "|---|---|---|---|---|"]
for phase in ("load", "reference", "judge"):
    lines.append(f"| {phase} | {whole.get(phase + '_gpu_mib')} | {fsdp.get(phase + '_gpu_mib')} | "
                 f"{whole[phase + '_mib']} | {fsdp[phase + '_mib']} |")
state = json.loads((out / "loop" / "state.json").read_text())["completed"]
lines += ["", "## The loop, one iteration (seconds per stage; peak GPU memory of the training stages)", "",
          "| stage | seconds |", "|---|---|"] + [f"| {k} | {v} |" for k, v in state.items()]
for d in ("sft", "rm", "loop/iter_1/dpo"):
    res = json.loads((out / d / "train_result.json").read_text())
    lines.append(f"\n{d}: {res['steps']} steps, {res.get('tokens_per_s')} tokens/s, peak GPU memory "
                 f"{res.get('peak_memory_gib')} GiB, loss {res['loss']:.4f}")
smi = out / "gpu_memory.csv"
used = [int(x.split(",")[1]) for x in smi.read_text().splitlines() if "," in x] if smi.exists() else []
if used:
    lines.append(f"\nnvidia-smi memory used (MiB): max {max(used)}, min {min(used)} over {len(used)} samples "
                 f"(min: between stages, nothing held)")
lines.append((out / "loop.log").read_text().strip().splitlines()[-1])
text = "\n".join(lines) + "\n"
(out / "scale.md").write_text(text)
print(text)
PY
