"""Shared fixtures: a tiny model + tokenizer and a small sandbox dataset, built once."""

from __future__ import annotations

import pytest

from rlhf_workflow.models.tiny import InitModelConfig, init_model, train_tokenizer
from rlhf_workflow.sandbox import MakeDataConfig, corpus, make_data


@pytest.fixture(scope="session")
def sandbox_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("sandbox-data")
    cfg = MakeDataConfig(out=str(out), n_train_prompts=200, n_eval_prompts=40, n_sft=600,
                         n_prefs=400, n_prefs_test=100)
    make_data(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    init_model(InitModelConfig(out=str(out), hidden_size=64, intermediate_size=128, num_heads=4,
                               num_kv_heads=2, vocab_size=600))
    return out


@pytest.fixture(scope="session", params=["chatml", "llama3"])
def tokenizer(request):
    return train_tokenizer(corpus()[:800], vocab_size=400, template=request.param)
