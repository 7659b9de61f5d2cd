#!/usr/bin/env bash
# One online iteration end to end on GPUs, in one command:
#   bash benchmarks/gpu_smoke.sh [OUT_DIR]
# A ~0.5B model built from a config (sandbox tokenizer) is SFT-trained and a BT reward model is
# trained from it (both FSDP2, fp32 master weights, bf16 compute, on every visible GPU); then
# `rlhf loop` runs one iteration: vLLM generation (one engine per GPU), annotation on every
# GPU, DPO with FSDP2, gold evaluation. Prints seconds per stage, training throughput and peak
# GPU memory, and writes them to OUT_DIR/smoke.md. Needs NVIDIA GPUs, Python >= 3.10 and pip
# access (vLLM installs its own CUDA build of torch into .venv-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_smoke}
GPUS=$(nvidia-smi -L | wc -l)
VENV=.venv-gpu
test -d $VENV || python3 -m venv $VENV
$VENV/bin/pip install --quiet --upgrade pip
$VENV/bin/pip install --quiet -e ".[dev]" vllm
R=$VENV/bin/rlhf
RUN="$VENV/bin/python -m torch.distributed.run --standalone --nproc_per_node $GPUS -m rlhf_workflow.cli"
FSDP="train.strategy=fsdp train.mixed_precision=bf16 train.progress=false"
mkdir -p $OUT

$R sandbox make-data out=$OUT/data n_sft=8000 n_prefs=8000 n_train_prompts=1024 n_eval_prompts=256
$R init-model out=$OUT/init arch=qwen2 vocab_size=4096 hidden_size=1536 num_layers=20 num_heads=12 \
    num_kv_heads=2 intermediate_size=4096 max_position_embeddings=1024
$RUN sft model.path=$OUT/init data.train=$OUT/data/sft.jsonl \
    data.max_length=1024 optim.lr=3e-4 train.epochs=1 train.global_batch_size=64 train.micro_batch_size=8 \
    train.output_dir=$OUT/sft $FSDP
$RUN rm train model.path=$OUT/sft/model data.train=$OUT/data/prefs_train.jsonl \
    data.test=$OUT/data/prefs_test.jsonl data.max_length=512 optim.lr=1e-5 train.epochs=1 \
    train.global_batch_size=64 train.micro_batch_size=16 train.output_dir=$OUT/rm $FSDP
$R loop out=$OUT/loop iterations=1 processes=$GPUS policy.path=$OUT/sft/model policy.dtype=bf16 \
    prompts.source=$OUT/data/prompts_train.jsonl prompts.per_iteration=1024 \
    generate.backend=vllm generate.vllm.engines=0 generate.vllm.gpu_memory_utilization=0.6 \
    generate.sampling.n=8 generate.sampling.max_new_tokens=64 generate.chunk_size=512 \
    annotate.annotator.path=$OUT/rm/model annotate.annotator.dtype=bf16 annotate.annotator.max_length=512 \
    dpo.data.max_length=512 dpo.optim.lr=5e-7 dpo.train.global_batch_size=128 dpo.train.micro_batch_size=8 \
    dpo.train.strategy=fsdp dpo.train.mixed_precision=bf16 dpo.train.progress=false \
    eval.prompts=$OUT/data/prompts_eval.jsonl eval.sampling.max_new_tokens=64

$VENV/bin/python - "$OUT" "$GPUS" <<'PY'
import json, sys
from pathlib import Path
out, gpus = Path(sys.argv[1]), sys.argv[2]
lines = [f"# GPU smoke run ({gpus} GPU(s))", "", "| stage | seconds | tokens/s | peak GPU memory (GiB) |",
         "|---|---|---|---|"]
for name, d in (("SFT (fsdp, bf16)", out / "sft"), ("reward model (fsdp, bf16)", out / "rm"),
                ("DPO, iteration 1 (fsdp, bf16)", out / "loop" / "iter_1" / "dpo")):
    r = json.loads((d / "train_result.json").read_text())
    lines.append(f"| {name} | - | {r.get('tokens_per_s')} | {r.get('peak_memory_gib')} |")
for stage, sec in json.loads((out / "loop" / "state.json").read_text())["completed"].items():
    lines.append(f"| loop {stage} | {sec} | | |")
text = "\n".join(lines) + "\n"
(out / "smoke.md").write_text(text)
print(text)
PY
