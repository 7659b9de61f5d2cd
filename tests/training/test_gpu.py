"""GPU checks (skipped without CUDA; run them with `pytest tests/training/test_gpu.py` on a GPU
machine): attention gradients under bf16 stay finite once a training engine exists, and our bf16
DPO step (one process and FSDP2) trains fp32 weights from a first loss of log 2.
`RLHF_GPU_TESTS_ON_CPU=1` runs the DPO step's test on the CPU, to see it pass or fail without a GPU."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from rlhf_workflow.training.engine import Engine

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
on_cpu_too = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("RLHF_GPU_TESTS_ON_CPU") == "1"),
                                reason="needs a CUDA GPU (or RLHF_GPU_TESTS_ON_CPU=1)")


def _masked_attention_grad_is_finite() -> bool:
    """A masked bf16 attention whose rows all have a log-sum-exp far below ln(FLT_MAX) at a
    length of 64 mod 128: the shape on which cuDNN's backward (torch >= 2.11, H100/H200)
    returns NaN for the query gradient (pytorch/pytorch#196678)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d = 576, 64
    q = torch.randn(1, 2, n, d, device="cuda", generator=g).mul(0.1).bfloat16()
    k = torch.randn(1, 2, n, d, device="cuda", generator=g).mul(0.1).bfloat16()
    v = torch.randn(1, 2, n, d, device="cuda", generator=g).bfloat16()
    q[..., 0], k[..., 0] = 1.0, -110 * math.sqrt(d)  # every score about -110
    q.requires_grad_()
    mask = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.backward(torch.randn(out.shape, device="cuda", generator=g, dtype=out.dtype))
    return bool(torch.isfinite(q.grad).all())


@needs_cuda
def test_a_training_engine_keeps_bf16_attention_gradients_finite():
    Engine("single", "bf16", 0, 1, torch.device("cuda"))
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert _masked_attention_grad_is_finite()


@on_cpu_too
@pytest.mark.parametrize("strategy", ["single", "fsdp"])
def test_bf16_dpo_on_a_gpu_trains_fp32_weights_from_log_2(strategy, tiny_model, sandbox_data, tmp_path):
    """Our DPO step on the GPU (one process, and FSDP2 on one rank through torchrun), bf16
    compute: the reference pass on training's own batches makes the first loss exactly log 2,
    every loss and gradient norm is finite, the loss falls, and the fp32 weights that were
    trained are what the exported model holds (changed from the start)."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / strategy
    args = [f"model.path={tiny_model}", f"data.train={sandbox_data / 'prefs_train.jsonl'}", "data.max_length=96",
            "optim.lr=1e-3", "optim.warmup_ratio=0", "train.max_steps=8", "train.global_batch_size=8",
            "train.micro_batch_size=4", f"train.output_dir={out}", "train.progress=false", "train.log_every=1",
            "train.mixed_precision=bf16", f"train.strategy={strategy}"]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if strategy == "fsdp" else []
    done = subprocess.run([sys.executable, *launcher, "-m", "rlhf_workflow.cli", "dpo", *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    losses = [r["loss"] for r in rows]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and len(losses) == 8
    assert rows[0]["rewards/margin"] == 0.0  # (policy == reference, on the same batches)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert sum(losses[-3:]) / 3 < losses[0]
    if torch.cuda.is_available():  # (the training record has GPU memory only where it ran on the GPU)
        assert "peak_memory_gib" in rows[-1]
    (trained,), (start,) = (list(p.glob("*.safetensors")) for p in (out / "model", tiny_model))
    trained, start = load_file(trained), load_file(start)
    assert all(t.dtype == torch.float32 for t in trained.values())
    assert any((trained[k] - start[k]).abs().max() > 1e-4 for k in start)
