"""Tiny tokenizer + model: built locally, saved like a hub checkpoint, reloadable by Auto*."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from rlhf_workflow.config import load_config
from rlhf_workflow.errors import UserError
from rlhf_workflow.models.tiny import (
    TEMPLATES,
    InitModelConfig,
    init_model,
    read_corpus,
    tiny_config,
    train_tokenizer,
)

TEXTS = (
    [f"What is {a} + {b}?" for a in range(10) for b in range(10)]
    + [f"Answer: {n}" for n in range(20)]
    + ["Sort: 3 9 1", "Reverse: c a t", "The cat sat on the mat.", "Birds fly south in winter."] * 5
)
TRICKY = [
    "What is 3 + 5?",
    "  leading spaces and\ttabs\n\nnew lines\r\n",
    "unicode: é ü 日本語 🙂 e\u0301 Ａ",
    "numbers 1234567890 and 3.14",
    "",
    " ",
    "<|im_start|>user\nhi<|im_end|>\n",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3 + 5?"},
    {"role": "assistant", "content": "Answer: 8"},
]


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tok(request) -> PreTrainedTokenizerFast:
    return train_tokenizer(TEXTS, vocab_size=400, template=request.param)


@pytest.fixture()
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def _init(tmp_path, corpus_file, name="model", **kw):
    return init_model(InitModelConfig(out=str(tmp_path / name), corpus=str(corpus_file), **kw))


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids_never_split(tok):
    style = "chatml" if tok.bos_token is None else "llama3"
    for special in TEMPLATES[style]["specials"]:
        ids = tok.encode(special)
        assert len(ids) == 1 and ids[0] in tok.all_special_ids, special
        embedded = tok.encode(f"x{special}y 12")
        assert ids[0] in embedded
        assert tok.convert_ids_to_tokens(embedded).count(special) == 1
    assert len(set(tok.all_special_ids)) == len(TEMPLATES[style]["specials"])


def test_other_styles_tokens_are_plain_text(tok):
    foreign = "<|eot_id|>" if tok.bos_token is None else "<|im_end|>"
    assert len(tok.encode(foreign)) > 1


def test_digits_are_single_tokens():
    # numbers repeated often enough that BPE would merge them if digits were not pre-split
    tok = train_tokenizer(TEXTS + ["12345 + 67890 = 80235"] * 50, vocab_size=400)
    pieces = tok.convert_ids_to_tokens(tok.encode("12345 + 67890 = 80235"))
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("1234567890" + "80235")


def test_a_and_b_are_single_distinct_tokens():
    t = train_tokenizer(["no capital letters here", "x y z"], vocab_size=300)
    a, b = t.encode("A"), t.encode("B")
    assert len(a) == 1 and len(b) == 1 and a != b


def test_no_special_tokens_added_when_encoding(tok):
    ids = tok("hello")["input_ids"]
    assert not set(ids) & set(tok.all_special_ids)


def test_pad_eos_distinct_and_padding_right(tok):
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    batch = tok(["a", "a b c"], padding=True)["input_ids"]
    assert batch[0][-1] == tok.pad_token_id


def test_chatml_template():
    t = train_tokenizer(TEXTS, vocab_size=400, template="chatml")
    assert t.bos_token is None and t.eos_token == "<|im_end|>" and t.pad_token == "<|pad|>"
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 3 + 5?<|im_end|>\n"
        "<|im_start|>assistant\nAnswer: 8<|im_end|>\n"
    )
    assert t.apply_chat_template(CHAT, tokenize=False) == expected
    prompt = t.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 3 + 5?<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_template():
    t = train_tokenizer(TEXTS, vocab_size=400, template="llama3")
    assert (t.bos_token, t.eos_token, t.pad_token) == ("<|begin_of_text|>", "<|eot_id|>", "<|pad|>")
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 3 + 5?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nAnswer: 8<|eot_id|>"
    )
    assert t.apply_chat_template(CHAT, tokenize=False) == expected
    prompt = t.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 3 + 5?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = t.apply_chat_template(CHAT[1:2], add_generation_prompt=True, return_dict=True)
    ids = ids["input_ids"]
    assert ids.count(t.bos_token_id) == 1 and ids[0] == t.bos_token_id


def test_tiny_config_matches_tokenizer(tok):
    for arch in ("llama", "qwen2"):
        cfg = tiny_config(tok, arch=arch)
        assert cfg.model_type == arch and cfg.vocab_size == len(tok)
        assert (cfg.eos_token_id, cfg.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
        assert cfg.bos_token_id == tok.bos_token_id


# --------------------------------------------------------------------------- config


def test_bad_head_counts_rejected():
    with pytest.raises(
        ValidationError, match=r"hidden_size \(130\) must be divisible by num_heads"
    ):
        InitModelConfig(hidden_size=130)
    with pytest.raises(ValidationError, match="must be divisible by num_kv_heads"):
        InitModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(UserError, match=r"config: hidden_size \(130\) must be divisible by num_heads \(4\)"):
        load_config(InitModelConfig, overrides=["hidden_size=130"])
    InitModelConfig(hidden_size=96, num_heads=6, num_kv_heads=3)


# --------------------------------------------------------------------------- init_model


@pytest.mark.parametrize(
    "arch,template", [("llama", "chatml"), ("llama", "llama3"), ("qwen2", "chatml")]
)
def test_init_model_saves_reloadable_checkpoint(tmp_path, corpus_file, arch, template):
    out = _init(tmp_path, corpus_file, arch=arch, template=template)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert [p.name for p in tmp_path.iterdir() if p.name != corpus_file.name] == ["model"]

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == arch and model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.data_ptr() != model.lm_head.weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.2e6 < n_params < 10e6

    reference = train_tokenizer(TEXTS, 1024, template)
    texts = TEXTS[::7] + TRICKY
    if arch == "qwen2":  # transformers 5 reloads it as Qwen2Tokenizer, which adds NFC
        texts = [unicodedata.normalize("NFC", t) for t in texts]
    for text in texts:  # the reloaded tokenizer is the one we trained
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id != tok.pad_token_id
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)

    batch = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 5?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt_len = batch["input_ids"].shape[1]
    out_ids = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out_ids.shape[0] == 1 and prompt_len < out_ids.shape[1] <= prompt_len + 4


def test_same_seed_same_weights_other_seed_differs(tmp_path, corpus_file):
    a = load_file(_init(tmp_path, corpus_file, "a", seed=1) / "model.safetensors")
    b = load_file(_init(tmp_path, corpus_file, "b", seed=1) / "model.safetensors")
    c = load_file(_init(tmp_path, corpus_file, "c", seed=2) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    tok_a = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    assert tok_a == json.loads((tmp_path / "c" / "tokenizer.json").read_text())


def test_init_model_replaces_existing_folder(tmp_path, corpus_file):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    _init(tmp_path, corpus_file)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corpus.txt", "model"])


def test_init_model_failure_leaves_old_folder_untouched(tmp_path, corpus_file, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _init(tmp_path, corpus_file)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corpus.txt", "model"])


# --------------------------------------------------------------------------- corpus files


def test_read_corpus_txt_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first line\n\nsecond  line \n", encoding="utf-8")
    assert read_corpus(txt) == ["first line", "second  line "]
    jsonl = tmp_path / "c.jsonl"
    rows = [{"prompt": "What is 1 + 1?", "n": 3, "chosen": {"text": "2"}}, {"x": ["a", "b"]}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert read_corpus(jsonl) == ["What is 1 + 1?", "2", "a", "b"]


@pytest.mark.parametrize("content", [None, "", "\n\n", '{"n": 1}\n'])
def test_missing_or_empty_corpus_is_user_error(tmp_path, content):
    path = tmp_path / ("c.jsonl" if content and "{" in content else "c.txt")
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=str(path)) as err:
        init_model(InitModelConfig(out=str(tmp_path / "m"), corpus=str(path)))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m").exists()


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"a": "ok"}\n{not json\n')
    with pytest.raises(UserError, match=rf"{path}:2: not valid JSON"):
        read_corpus(path)


def test_default_corpus_is_the_sandbox(tmp_path):
    from rlhf_workflow.sandbox import corpus

    out = init_model(InitModelConfig(out=str(tmp_path / "m")))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok.encode(corpus()[0])) == corpus()[0]
