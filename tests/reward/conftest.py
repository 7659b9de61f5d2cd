"""Reward-model fixtures: a tiny BERT-style encoder and fast training configs (the trained BT
model and PM, ``trained_rm`` / ``trained_pm``, live in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bert_model(tmp_path_factory):
    """A tiny BERT sequence classifier and a WordPiece tokenizer trained on the sandbox corpus:
    no chat template, so pairs are read as text pairs ``[CLS] prompt [SEP] response [SEP]``."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from rlhf_workflow.sandbox import corpus

    out = tmp_path_factory.mktemp("bert")
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(
        corpus()[:800],
        vocab_size=400,
        show_progress=False,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    )
    wp.save_model(str(out))
    tok = BertTokenizerFast(vocab=str(out / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def rm_cfg(judge_cfg):
    """``rm_cfg(out, *overrides)``: a fast BT training config on the sandbox pairs."""
    return lambda out, *overrides: judge_cfg("rm", out, *overrides)


@pytest.fixture
def pm_cfg(judge_cfg):
    """``pm_cfg(out, *overrides)``: a fast PM training config on the sandbox pairs."""
    return lambda out, *overrides: judge_cfg("pm", out, *overrides)


@pytest.fixture(scope="session")
def small_prefs(sandbox_data, tmp_path_factory):
    """(train, test): the first 64 / 16 sandbox pairs, for tests that only need a step or two."""
    out = tmp_path_factory.mktemp("small-prefs")
    paths = []
    for name, n in (("prefs_train", 64), ("prefs_test", 16)):
        lines = (sandbox_data / f"{name}.jsonl").read_text().splitlines()[:n]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        paths.append(out / f"{name}.jsonl")
    return tuple(paths)
