"""The chunked log-prob primitive equals the full-vocabulary computation, values and gradients."""

import pytest
import torch

from rlhf_workflow.config import ModelConfig
from rlhf_workflow.data.chat import IGNORE
from rlhf_workflow.models import logprobs
from rlhf_workflow.models.loading import load_model


def naive_logps(model, inputs, targets):
    """The textbook way: all logits, fp32 log-softmax over the vocabulary, gather."""
    logits = model(**inputs).logits[:, -targets.shape[1]:].float()
    lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return lp * (targets != IGNORE)


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0  # a padded row
    targets = torch.full((3, 12), IGNORE)
    targets[:, :-1] = ids[:, 9:]  # next tokens of the last 12 positions (the last one has none)
    targets[0, :3] = IGNORE  # prompt positions
    targets[2, 5:] = IGNORE  # padding
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    return inputs, targets


@pytest.mark.parametrize("chunk_bytes", [4 * 600 * 5, logprobs.CHUNK_BYTES])  # 5 positions per chunk, or one chunk
def test_values_and_gradients_equal_the_full_vocabulary_computation(tiny_model, chunk_bytes, monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", chunk_bytes)
    model = load_model(ModelConfig(path=str(tiny_model)))
    inputs, targets = _batch(model.config.vocab_size)
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))

    fast = logprobs.target_logps(model, inputs, targets)
    (fast * weights).sum().backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    slow = naive_logps(model, inputs, targets)
    (slow * weights).sum().backward()

    assert fast.shape == targets.shape and fast.dtype == torch.float32
    assert (fast[targets == IGNORE] == 0).all() and (fast[targets != IGNORE] < 0).all()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_fast[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_no_grad_path_and_the_model_computes_no_logits(tiny_model):
    model = load_model(ModelConfig(path=str(tiny_model))).eval()
    inputs, targets = _batch(model.config.vocab_size, seed=3)
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        fast = logprobs.target_logps(model, inputs, targets)
    handle.remove()
    # the forward's own head call got an empty slice; the head then ran on target tokens only
    assert shapes[0] == (3, 0, model.config.vocab_size)
    assert sum(s[0] for s in shapes[1:]) == int((targets != IGNORE).sum())
    with torch.no_grad():
        torch.testing.assert_close(fast, naive_logps(model, inputs, targets), atol=1e-5, rtol=1e-5)


def test_final_soft_capping_is_applied(tiny_model):
    model = load_model(ModelConfig(path=str(tiny_model))).eval()
    model.config.final_logit_softcapping = 0.5  # Gemma-2 style: logits -> cap * tanh(logits / cap)
    h = torch.randn(4, model.config.hidden_size)
    t = torch.tensor([1, 7, 9, 11])
    with torch.no_grad():
        logits = 0.5 * torch.tanh(model.lm_head(h) / 0.5)
        expected = torch.log_softmax(logits, -1).gather(-1, t[:, None])[:, 0]
        torch.testing.assert_close(logprobs.head_logps(model, h, t), expected)


def test_a_plain_head_is_called_once_forward_and_backward(tiny_model, monkeypatch):
    """Chunks loop inside one head call, so ZeRO-3 or a sharded head gathers its weight once per
    micro-batch; the gradients (scale and soft-capping included) equal autograd's through the
    full logits."""
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * 600 * 3)  # 3 positions a chunk
    model = load_model(ModelConfig(path=str(tiny_model)))
    model.config.logit_scale, model.config.final_logit_softcapping = 0.7, 2.0
    h = torch.randn(10, model.config.hidden_size, requires_grad=True)
    t = torch.randint(0, model.config.vocab_size, (10,), generator=torch.Generator().manual_seed(2))
    calls = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: calls.append(len(a[0])))
    fast = logprobs.head_logps(model, h, t)
    handle.remove()
    assert calls == [10]
    w = torch.linspace(-1, 1, 10)
    g_fast = torch.autograd.grad((fast * w).sum(), [h, model.lm_head.weight])
    logits = 2.0 * torch.tanh(model.lm_head(h) * 0.7 / 2.0)
    slow = torch.log_softmax(logits, -1).gather(-1, t[:, None])[:, 0]
    g_slow = torch.autograd.grad((slow * w).sum(), [h, model.lm_head.weight])
    torch.testing.assert_close(fast, slow)
    for a, b in zip(g_fast, g_slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_under_bf16_autocast_the_head_computes_as_autograd_would(tiny_model, monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * 600 * 4)
    model = load_model(ModelConfig(path=str(tiny_model)))
    h = torch.randn(9, model.config.hidden_size, requires_grad=True)
    t = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = logprobs.head_logps(model, h, t)
        slow = torch.log_softmax(model.lm_head(h).float(), -1).gather(-1, t[:, None])[:, 0]
    g_fast = torch.autograd.grad(fast.sum(), [h, model.lm_head.weight])
    g_slow = torch.autograd.grad(slow.sum(), [h, model.lm_head.weight])
    torch.testing.assert_close(fast, slow)
    for a, b in zip(g_fast, g_slow, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_a_wrapped_head_runs_per_chunk(tiny_model, monkeypatch):
    """A head whose forward is not a plain linear one (as a LoRA layer) takes the per-chunk path."""
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * 600 * 5)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 1.5

    model = load_model(ModelConfig(path=str(tiny_model))).eval()
    old = model.lm_head
    model.lm_head = Scaled(old.in_features, old.out_features, bias=False)
    model.lm_head.weight = old.weight
    inputs, targets = _batch(model.config.vocab_size, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(logprobs.target_logps(model, inputs, targets), naive_logps(model, inputs, targets),
                                   atol=1e-5, rtol=1e-5)
