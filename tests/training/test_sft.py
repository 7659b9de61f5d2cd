"""The shared loop through the SFT stage: invariances, resume, packing, and the CLI end to end."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf_workflow.cli import main
from rlhf_workflow.config import ModelConfig, load_config
from rlhf_workflow.data.batching import collate_rows
from rlhf_workflow.data.chat import tokenize_conversation
from rlhf_workflow.data.pairs import CHARS_PER_TOKEN
from rlhf_workflow.data.readers import read_records
from rlhf_workflow.data.records import SFTExample
from rlhf_workflow.models.loading import load_model, load_tokenizer
from rlhf_workflow.training import sft
from rlhf_workflow.training.sft import SFTConfig, run_sft, sft_objective, tokenize_sft


def _cfg(tiny_model, sandbox_data, out, *overrides):
    return load_config(SFTConfig, None, [
        f"model.path={tiny_model}", f"data.train={sandbox_data / 'sft.jsonl'}",
        "data.max_length=128", "optim.lr=1e-3", "optim.warmup_ratio=0", f"train.output_dir={out}",
        "train.progress=false", "train.log_every=1", *overrides,
    ])


def _weights(out):
    return load_file(out / "model" / "model.safetensors")


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_invariance(tiny_model, sandbox_data, tmp_path):
    """batch 8 x accumulation 1 gives the same updates as batch 2 x accumulation 4."""
    a = run_sft(_cfg(tiny_model, sandbox_data, tmp_path / "a", "train.max_steps=3",
                     "train.global_batch_size=8", "train.micro_batch_size=8"))
    b = run_sft(_cfg(tiny_model, sandbox_data, tmp_path / "b", "train.max_steps=3",
                     "train.global_batch_size=8", "train.micro_batch_size=2"))
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=1e-4)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-4)
    # and the step really moved the weights away from the initial model
    init = load_file(tiny_model / "model.safetensors")
    assert any(not torch.allclose(init[k], wa[k]) for k in wa)


def test_resume_gives_the_same_losses_and_weights(tiny_model, sandbox_data, tmp_path):
    common = ["train.max_steps=6", "train.save_every=2", "train.global_batch_size=4", "data.packing=false"]
    run_sft(_cfg(tiny_model, sandbox_data, tmp_path / "full", *common))

    def crash(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sft(_cfg(tiny_model, sandbox_data, tmp_path / "crash", *common), on_step=crash)
    assert not (tmp_path / "crash" / "model").exists()
    assert (tmp_path / "crash" / "checkpoints" / "step-000002" / "state.json").exists()
    run_sft(_cfg(tiny_model, sandbox_data, tmp_path / "crash", *common))
    steps = [json.loads(line)["step"] for line in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3 was redone, not duplicated
    assert _losses(tmp_path / "crash") == pytest.approx(_losses(tmp_path / "full"), rel=1e-6)
    wa, wb = _weights(tmp_path / "full"), _weights(tmp_path / "crash")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_same_loss_as_unpacked(tiny_model, sandbox_data, attn):
    cfg = _cfg(tiny_model, sandbox_data, "unused", f"model.attn_implementation={attn}")
    tok, model = load_tokenizer(cfg.model), load_model(cfg.model).eval()
    seqs, _ = tokenize_sft(tok, read_records(cfg.data.train, SFTExample)[:6], 128, "all")
    packed = collate_rows([seqs[:3], seqs[3:]], tok.pad_token_id)
    unpacked = collate_rows([[s] for s in seqs], tok.pad_token_id)
    assert packed["packed"] and not unpacked["packed"]
    with torch.no_grad():
        lp = sft_objective(model, packed).loss_sum
        lu = sft_objective(model, unpacked).loss_sum
    torch.testing.assert_close(lp, lu, atol=1e-4, rtol=1e-5)


def test_sft_cli_end_to_end(tiny_model, sandbox_data, tmp_path):
    out = tmp_path / "sft"
    code = main(["sft", f"model.path={tiny_model}", f"data.train={sandbox_data / 'sft.jsonl'}",
                 "data.max_length=128", "optim.lr=2e-3", "train.epochs=2", "train.global_batch_size=4",
                 f"train.output_dir={out}", "train.progress=false", "train.log_every=5"])
    assert code == 0
    assert (out / "config.yaml").exists() and (out / "model" / "model.safetensors").exists()
    assert load_config(SFTConfig, out / "config.yaml").optim.lr == 2e-3
    losses = _losses(out)
    assert losses[-1] < 0.7 * losses[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "model")
    assert AutoTokenizer.from_pretrained(out / "model").chat_template


def test_a_huge_message_is_cut_by_characters_first_and_tokenizes_as_the_whole(tiny_model, monkeypatch):
    tok = load_tokenizer(ModelConfig(path=str(tiny_model)))
    words = " ".join(f"w{i % 97}" for i in range(40_000))  # ~150K characters
    messages = [{"role": "user", "content": "Summarise."}, {"role": "assistant", "content": "ok " + words}]
    whole = tokenize_conversation(tok, messages)
    seen = []
    monkeypatch.setattr(sft, "tokenize_conversation",
                        lambda t, m, on: seen.append(max(len(x["content"]) for x in m)) or tokenize_conversation(t, m, on))
    cut = sft.tokenize_example(tok, SFTExample(messages=messages), 256, "all")
    assert cut.input_ids == whole.input_ids[:256] and cut.loss_mask == whole.loss_mask[:256]
    huge = [{"role": "user", "content": "x" * 50_000_000}, {"role": "assistant", "content": "5"}]
    assert sft.tokenize_example(tok, SFTExample(messages=huge), 256, "all") is None  # the answer lies past 256 tokens
    assert seen == [256 * CHARS_PER_TOKEN] * 2  # what was tokenized: never the 50 MB
