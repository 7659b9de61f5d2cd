"""GPU-only checks (skipped without CUDA; run them with `pytest tests/training/test_gpu.py` on a
GPU machine): attention gradients under bf16 stay finite once a training engine exists."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_workflow.training.engine import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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


def test_a_training_engine_keeps_bf16_attention_gradients_finite():
    Engine("single", "bf16", 0, 1, torch.device("cuda"))
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert _masked_attention_grad_is_finite()

