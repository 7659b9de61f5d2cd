"""The DPO stage on tiny models: first-step loss, learning, invariances, the reference cache,
the reference choices, LoRA, the loss variants and the CLI end to end."""

import json
import math
import random
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rlhf_workflow.cli import main
from rlhf_workflow.config import ModelConfig, load_config
from rlhf_workflow.data.pairs import collate_pairs, tokenize_pair
from rlhf_workflow.data.readers import read_records
from rlhf_workflow.data.records import PreferencePair
from rlhf_workflow.models import loading
from rlhf_workflow.models.loading import load_model, load_tokenizer
from rlhf_workflow.models.tiny import InitModelConfig, init_model
from rlhf_workflow.training import dpo as dpo_module
from rlhf_workflow.training import reference as ref_cache
from rlhf_workflow.training.dpo import DPOConfig, run_dpo


@pytest.fixture(scope="module")
def learnable_pairs(tmp_path_factory):
    """Chosen always gives an answer, rejected always refuses: learnable in a few steps."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines = []
    for _ in range(64):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        lines.append(json.dumps({"prompt": f"Compute {a} + {b}.", "chosen": f"Answer: {a + b}",
                                 "rejected": "I am not sure about that."}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(model, data, out, *overrides):
    return load_config(DPOConfig, None, [
        f"model.path={model}", f"data.train={data}", "data.max_length=96", "optim.lr=1e-3",
        "optim.warmup_ratio=0", f"train.output_dir={out}", "train.progress=false",
        "train.log_every=1", "train.global_batch_size=8", "train.micro_batch_size=8", *overrides,
    ])


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _count_reference_passes(monkeypatch):
    calls = []
    real = ref_cache.compute_reference_logps

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ref_cache, "compute_reference_logps", counting)
    return calls


def test_first_loss_is_log2_then_loss_falls_and_reward_accuracy_rises(tiny_model, learnable_pairs, tmp_path):
    run_dpo(_cfg(tiny_model, learnable_pairs, tmp_path, "train.max_steps=10", "optim.lr=2e-3"))
    m = _metrics(tmp_path)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert m[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-4)
    assert sum(r["loss"] for r in m[-3:]) / 3 < m[0]["loss"] - 0.2
    assert m[-1]["reward_acc"] >= 0.9 > m[0]["reward_acc"]
    for key in ("grad_norm", "tokens_per_s", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected"):
        assert key in m[-1]


def test_accumulation_invariance(tiny_model, learnable_pairs, tmp_path):
    """8 pairs x accumulation 1 gives the same updates as 2 pairs x accumulation 4."""
    a = run_dpo(_cfg(tiny_model, learnable_pairs, tmp_path / "a", "train.max_steps=3"))
    b = run_dpo(_cfg(tiny_model, learnable_pairs, tmp_path / "b", "train.max_steps=3",
                     "train.micro_batch_size=2"))
    la, lb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    for ra, rb in zip(la, lb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
        assert ra["reward_acc"] == rb["reward_acc"]
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4)
    assert la[-1]["rewards/margin"] != 0


def test_resume_and_second_epoch_never_recompute_the_reference(tiny_model, learnable_pairs,
                                                                 tmp_path, monkeypatch):
    calls = _count_reference_passes(monkeypatch)
    common = ["train.epochs=2", "train.save_every=2", "train.global_batch_size=16"]
    run_dpo(_cfg(tiny_model, learnable_pairs, tmp_path / "full", *common))  # 4 steps per epoch
    assert len(calls) == 1  # one pass for both epochs

    def crash(step, record):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dpo(_cfg(tiny_model, learnable_pairs, tmp_path / "crash", *common), on_step=crash)
    assert len(calls) == 2
    run_dpo(_cfg(tiny_model, learnable_pairs, tmp_path / "crash", *common))
    assert len(calls) == 2  # the resumed run read the cache file
    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "crash")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], rel=1e-6)
    wa = load_file(tmp_path / "full" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "crash" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("micro", [1, 3, 8])
def test_the_first_loss_is_exactly_log2_in_bf16_at_any_batch_size(micro, tiny_model, learnable_pairs, tmp_path):
    """In bf16 a log-prob depends on the batch it is padded into; the reference pass runs the
    very micro-batches of the first epoch, so policy == reference gives exactly log 2."""
    run_dpo(_cfg(tiny_model, learnable_pairs, tmp_path, "train.max_steps=1", "train.mixed_precision=bf16",
                 "train.global_batch_size=24", f"train.micro_batch_size={micro}"))
    first = _metrics(tmp_path)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # (24 float32 terms summed)
    assert first["rewards/margin"] == 0.0


def test_cached_reference_logps_equal_fresh_ones(tiny_model, sandbox_data, tmp_path):
    cfg = ModelConfig(path=str(tiny_model))
    tok, model = load_tokenizer(cfg), load_model(cfg)
    records = read_records(sandbox_data / "prefs_train.jsonl", PreferencePair)[:24]
    pairs = [tokenize_pair(tok, r, 64, 16) for r in records]
    batched = ref_cache.compute_reference_logps(model, pairs, tok.pad_token_id, ref_cache.in_batches(24, 7),
                                                 progress=False)
    with torch.no_grad():  # one unpadded sequence at a time
        for i, p in enumerate(pairs):
            for j, t in enumerate((p.chosen, p.rejected)):
                logits = model(input_ids=torch.tensor([t.input_ids])).logits[0]
                targets = torch.tensor(t.targets())
                keep = targets != -100  # full-vocabulary log-softmax, gathered at response tokens
                fresh = torch.log_softmax(logits[keep], -1).gather(-1, targets[keep][:, None]).sum()
                assert batched[i, j].item() == pytest.approx(fresh.item(), abs=1e-4)
    key = ref_cache.cache_key(ref_cache.model_identity(tiny_model), "fp32", "tokens")
    path = ref_cache.cache_path(tmp_path, key)
    ref_cache.save_cache(path, key, batched, str(tiny_model))
    assert torch.equal(ref_cache.load_cache(path, key, len(pairs)), batched)
    # another key (other data, dtype or reference) never reads this file
    assert ref_cache.load_cache(path, "other", len(pairs)) is None
    tokens = "tokens"
    assert ref_cache.cache_key(ref_cache.model_identity(tiny_model), "fp32", "other tokens") != key
    assert ref_cache.cache_key(ref_cache.model_identity(tiny_model), "bf16", tokens) != key
    assert ref_cache.cache_key(ref_cache.model_identity(sandbox_data), "fp32", tokens) != key
    # the bf16 pass is close to the fp32 one
    half = ref_cache.compute_reference_logps(model, pairs, tok.pad_token_id, ref_cache.in_batches(24, 7), "bf16",
                                              progress=False)
    torch.testing.assert_close(half, batched, rtol=0.02, atol=0.5)


def test_the_reference_key_follows_the_cached_tokens(tiny_model, sandbox_data, tmp_path):
    """The reference cache is keyed by a digest of the token cache's arrays (read in place, no
    pass over Python lists): the same tokens give the same digest, other tokens another."""
    tok = load_tokenizer(ModelConfig(path=str(tiny_model)))
    cfg = lambda n: _cfg(tiny_model, sandbox_data / "prefs_train.jsonl", tmp_path, f"data.max_length={n}")  # noqa: E731
    a, again, short = (dpo_module.tokenize_dpo_pairs(cfg(n), tok) for n in (256, 256, 48))
    assert a.digest() == again.digest() != short.digest()
    assert any(p.truncated for p in short.pairs())  # (48 tokens cut prompts: other tokens)


@pytest.mark.parametrize("max_length", [64, 256])  # 64: truncated pairs, prompts cut differently
def test_shared_prompt_layout_gives_the_same_logps_and_gradients(tiny_model, sandbox_data, max_length):
    cfg = ModelConfig(path=str(tiny_model))
    tok, model = load_tokenizer(cfg), load_model(cfg)
    records = read_records(sandbox_data / "prefs_train.jsonl", PreferencePair)[:16]
    pairs = [tokenize_pair(tok, r, max_length, 16) for r in records]
    assert any(p.shared_prefix > 10 for p in pairs)
    two_rows = ref_cache.compute_reference_logps(model, pairs, tok.pad_token_id, ref_cache.in_batches(16, 5),
                                                  progress=False)
    shared = ref_cache.compute_reference_logps(model, pairs, tok.pad_token_id, ref_cache.in_batches(16, 5),
                                                progress=False, shared=True)
    torch.testing.assert_close(shared, two_rows, atol=1e-4, rtol=1e-5)
    objective = dpo_module.dpo_objective(load_config(dpo_module.LossConfig, None, ["rpo_alpha=0.5"]))
    offset_ref = two_rows[:8] + torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    grads, outs = [], []
    for layout, rows in ((False, None), (True, None), (True, [3, 5])):  # (last: pairs packed into 2 rows)
        model.zero_grad()
        batch = collate_pairs(pairs[:8], tok.pad_token_id, layout, rows)
        batch["ref_logps"] = offset_ref  # policy != reference: a non-trivial gradient
        out = objective(model, batch)
        out.loss_sum.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other, other_grads in zip(outs[1:], grads[1:], strict=True):
        torch.testing.assert_close(other.loss_sum, outs[0].loss_sum, atol=1e-5, rtol=1e-5)
        for key in outs[0].metric_sums:
            torch.testing.assert_close(other.metric_sums[key], outs[0].metric_sums[key], atol=1e-4, rtol=1e-5)
        for name in grads[0]:
            torch.testing.assert_close(other_grads[name], grads[0][name], atol=1e-5, rtol=1e-4)


def _count_loads(monkeypatch) -> list[str]:
    """The paths of the models the stage loads, in order (the policy, the reference)."""
    loads = []
    for module in (loading, dpo_module):
        real = module.load_model
        monkeypatch.setattr(module, "load_model",
                            lambda cfg, *a, real=real, **k: loads.append(cfg.path) or real(cfg, *a, **k))
    return loads


def test_separate_reference_checkpoint(tiny_model, learnable_pairs, tmp_path, monkeypatch):
    other = init_model(InitModelConfig(out=str(tmp_path / "other"), hidden_size=64, intermediate_size=128,
                                       num_heads=4, num_kv_heads=2, vocab_size=600, seed=1))
    loads = _count_loads(monkeypatch)
    run_dpo(_cfg(tiny_model, learnable_pairs, tmp_path / "run", f"reference.path={other}", "train.max_steps=1"))
    assert loads == [str(other), str(tiny_model)]  # reference first (then freed), then the policy
    assert _metrics(tmp_path / "run")[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)
    (cache,) = (tmp_path / "run").glob("ref_logps-*.safetensors")
    with safe_open(str(cache), "pt") as f:
        assert f.metadata()["reference"] == str(other)
    assert load_config(DPOConfig, tmp_path / "run" / "config.yaml").reference.path == str(other)


def test_reference_named_as_the_starting_policy_is_not_loaded_twice(tiny_model, learnable_pairs,
                                                                    tmp_path, monkeypatch):
    loads = _count_loads(monkeypatch)
    run_dpo(_cfg(tiny_model, learnable_pairs, tmp_path, f"reference.path={tiny_model}", "train.max_steps=1"))
    assert loads == [str(tiny_model)]
    assert _metrics(tmp_path)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_lora_reference_is_the_base_model_without_a_second_copy(tiny_model, learnable_pairs, tmp_path,
                                                                  monkeypatch):
    pytest.importorskip("peft")
    loads = _count_loads(monkeypatch)
    out = run_dpo(_cfg(tiny_model, learnable_pairs, tmp_path, "lora.r=8", "optim.lr=1e-2",
                       "train.max_steps=6"))
    assert loads == [str(tiny_model)]  # one model in memory: the reference pass disabled the adapters
    m = _metrics(tmp_path)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert m[-1]["loss"] < m[0]["loss"]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain, merged checkpoint
    init = load_file(tiny_model / "model.safetensors")
    state = merged.state_dict()
    assert any(not torch.allclose(init[k], state[k]) for k in init)


# the first step's loss where the policy is its reference (h = 0): sigmoid log 2 (conservative DPO
# too: its two terms are equal at h = 0), IPO (0 - 1/(2 beta))^2 = 25, hinge max(0, 1 - 0) = 1
@pytest.mark.parametrize("overrides,first_loss", [
    (["loss.kind=ipo"], 25.0), (["loss.kind=hinge"], 1.0), (["loss.kind=simpo", "loss.gamma=0.5"], None),
    (["loss.label_smoothing=0.1", "loss.rpo_alpha=1.0"], None), (["loss.average_logps=true"], math.log(2)),
])
def test_loss_variants_train(tiny_model, learnable_pairs, tmp_path, overrides, first_loss, capsys):
    run_dpo(_cfg(tiny_model, learnable_pairs, tmp_path, "train.max_steps=10", "optim.lr=2e-3", *overrides))
    m = _metrics(tmp_path)
    if first_loss is not None:
        assert m[0]["loss"] == pytest.approx(first_loss, rel=1e-4)
    if "loss.rpo_alpha=1.0" in overrides:  # log 2 plus the chosen response's mean NLL
        assert m[0]["loss"] == pytest.approx(math.log(2) + m[0]["nll/chosen"], rel=1e-4)
    assert ("nll/chosen" in m[0]) == ("loss.rpo_alpha=1.0" in overrides)
    assert sum(r["loss"] for r in m[-3:]) / 3 < m[0]["loss"]  # it trains: the loss falls ...
    assert m[-1]["reward_acc"] >= 0.9 and m[-1]["rewards/margin"] > m[0]["rewards/margin"]  # ... the right way
    caches = list(tmp_path.glob("ref_logps-*"))
    assert len(caches) == (0 if "loss.kind=simpo" in overrides else 1)
    assert ("beta 2.0" if "loss.kind=simpo" in overrides else "beta 0.1") in capsys.readouterr().out  # per-loss beta


def test_a_tight_max_length_skips_pairs_whose_responses_do_not_fit(tiny_model, sandbox_data, tmp_path, capsys):
    run_dpo(_cfg(tiny_model, sandbox_data / "prefs_train.jsonl", tmp_path, "data.max_length=24",
                 "data.max_prompt_length=12", "train.max_steps=2"))
    out = capsys.readouterr().out
    kept, cut, skipped = (int(x) for x in re.search(r"dpo: (\d+) pairs \((\d+) with the prompt cut, (\d+) skipped",
                                                     out).groups())
    assert kept + skipped == 400 and kept > 0 and skipped > 0 and cut > 0
    m = _metrics(tmp_path)
    assert all(math.isfinite(r["loss"]) and r["logps/chosen"] < 0 and r["logps/rejected"] < 0 for r in m)


def test_dpo_cli_end_to_end_on_conversational_and_flat_pairs(tiny_model, sandbox_data, tmp_path):
    flat = read_records(sandbox_data / "prefs_train.jsonl", PreferencePair)[:48]
    conv = tmp_path / "conv.jsonl"
    conv.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": p.prompt}],
        "chosen": [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.chosen}],
        "rejected": [{"role": "assistant", "content": p.rejected}],
    }) + "\n" for p in flat))
    flat_file = tmp_path / "flat.jsonl"
    flat_file.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen,
                                             "rejected": p.rejected}) + "\n" for p in flat))
    args = [f"model.path={tiny_model}", "data.max_length=96", "optim.lr=1e-4", "train.epochs=1",
            "train.global_batch_size=16", "train.micro_batch_size=8",
            "train.progress=false"]
    for name, data in (("conv", conv), ("flat", flat_file)):
        assert main(["dpo", *args, f"data.train={data}", f"train.output_dir={tmp_path / name}"]) == 0
        assert (tmp_path / name / "model" / "model.safetensors").exists()
    # the two formats describe the same pairs: identical runs
    losses = {name: [r["loss"] for r in _metrics(tmp_path / name)] for name in ("conv", "flat")}
    assert losses["conv"] == pytest.approx(losses["flat"], rel=1e-6)  # the same pairs
    saved = load_config(DPOConfig, tmp_path / "flat" / "config.yaml")
    assert saved.reference.path is None and saved.loss.resolved_beta == 0.1 and saved.optim.lr == 1e-4
    assert main(["dpo", *args, f"data.train={flat_file}", "loss.kind=ipo", "loss.label_smoothing=0.1"]) == 2


def test_defaults_are_the_papers():
    cfg = DPOConfig()
    assert (cfg.loss.kind.value, cfg.loss.resolved_beta, cfg.optim.lr, cfg.optim.scheduler) == ("sigmoid", 0.1, 5e-7, "cosine")
    assert (cfg.optim.warmup_ratio, cfg.train.epochs, cfg.data.max_length) == (0.03, 2, 2048)
    assert cfg.train.global_batch_size == 128
    assert cfg.loss.average_logps is None and not cfg.loss.kind.averages_logps
