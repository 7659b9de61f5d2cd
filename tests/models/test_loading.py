"""Model specs (GGUF files included), one-line errors for folders that are not models, and
`rlhf export-model` on the tiny model (the GGUF path itself runs in tests/real)."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_workflow.cli import main
from rlhf_workflow.config import ModelConfig, load_config
from rlhf_workflow.errors import UserError
from rlhf_workflow.models.loading import load_model, load_tokenizer, split_gguf
from rlhf_workflow.training.sft import SFTConfig


def test_gguf_file_is_joined_into_the_path():
    a = ModelConfig(path="models/smol", gguf_file="m.Q4.gguf")
    b = ModelConfig(path="models/smol/m.Q4.gguf")
    assert a == b and a.path == "models/smol/m.Q4.gguf" and a.gguf_file is None
    cfg = load_config(SFTConfig, None, ["model.path=models/smol/", "model.gguf_file=m.Q4.gguf"])
    assert cfg.model.path == "models/smol/m.Q4.gguf"
    # a copy for another checkpoint (the loop's next policy) loads that checkpoint, not the GGUF
    assert split_gguf(a.model_copy(update={"path": "runs/dpo/model"}).path) == ("runs/dpo/model", None)
    assert split_gguf("models/smol/m.Q4.gguf") == ("models/smol", "m.Q4.gguf")
    assert split_gguf("m.gguf") == (".", "m.gguf")


def _error(capsys, *args) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_a_gguf_folder_says_how_to_use_it(tmp_path, capsys):
    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / "smol.Q4_1.gguf").write_bytes(b"GGUF")
    err = _error(capsys, "sft", f"model.path={folder}", f"train.output_dir={tmp_path / 'out'}")
    assert f"{folder} is a GGUF folder (smol.Q4_1.gguf)" in err
    assert "model.gguf_file=smol.Q4_1.gguf" in err and "rlhf export-model" in err


def test_folders_that_are_not_models_name_what_was_expected_and_found(tmp_path, tiny_model, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="expected config.json and .*safetensors.*found an empty folder"):
        load_model(ModelConfig(path=str(empty)))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_model, no_weights)
    (no_weights / "model.safetensors").unlink()
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds only pickled weights \(pytorch_model.bin\), which are not "
                                         r"loaded: unpickling can run code. Convert them once"):
        load_model(ModelConfig(path=str(no_weights)))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(UserError, match="a weight file is corrupt or truncated"):
        load_model(ModelConfig(path=str(corrupt)))
    with pytest.raises(UserError, match="holds no tokenizer: expected tokenizer.json.*found config.json"):
        load_tokenizer(ModelConfig(path=str(_only_config(tiny_model, tmp_path))))
    err = _error(capsys, "sft", f"model.path={tiny_model / 'config.json'}", f"train.output_dir={tmp_path / 'o'}")
    assert "config.json is a file; expected a Hugging Face model folder" in err


def _only_config(model, tmp_path):
    d = tmp_path / "only_config"
    d.mkdir()
    shutil.copy(model / "config.json", d)
    return d


def test_library_errors_come_as_one_whole_line(tmp_path, tiny_model):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    (bad / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(UserError) as e:
        load_model(ModelConfig(path=str(bad)))
    msg = str(e.value)
    assert "\n" not in msg and "expected a Hugging Face model folder" in msg
    assert "no-such-architecture" in msg and "does not recognize this architecture" in msg


def test_export_model_writes_a_plain_folder(tmp_path, tiny_model, capsys):
    out = tmp_path / "exported"
    assert main(["export-model", f"model.path={tiny_model}", f"out={out}"]) == 0
    assert f"-> {out}" in capsys.readouterr().out
    src, tok_src = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    got, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok_src.apply_chat_template([{"role": "user", "content": "What is 3 + 5?"}],
                                                    add_generation_prompt=True, tokenize=True, return_dict=False)])
    assert torch.equal(src(ids).logits, got(ids).logits)
    assert tok.chat_template == tok_src.chat_template and (out / "export_config.yaml").is_file()
    assert main(["export-model", f"model.path={tiny_model}", f"out={out}"]) == 2  # never replaced silently
    assert "exists already" in capsys.readouterr().err
    assert main(["export-model", f"model.path={tiny_model}", f"out={out}", "overwrite=true"]) == 0


def test_a_tied_head_is_saved_once_from_gathered_or_converted_weights(tmp_path):
    """Weights gathered from shards, or converted to another dtype, no longer share storage:
    the tied head is still written once (as save_pretrained writes it), and reloads tied."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_workflow.models.loading import save_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # as from FSDP: separate tensors
    assert "lm_head.weight" in gathered
    for out, kw in ((tmp_path / "gathered", {"state_dict": gathered}), (tmp_path / "bf16", {"dtype": "bf16"})):
        save_model(model, None, out, **kw)
        assert "lm_head.weight" not in load_file(out / "model.safetensors")
        back = AutoModelForCausalLM.from_pretrained(out)
        assert back.lm_head.weight is back.model.embed_tokens.weight
        torch.testing.assert_close(back.lm_head.weight.float(), model.lm_head.weight,
                                   atol=1e-2 if "dtype" in kw else 0, rtol=1e-2 if "dtype" in kw else 0)
