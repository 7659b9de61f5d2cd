"""Shared fixtures: a tiny model + tokenizer and a small sandbox dataset, built once."""

from __future__ import annotations

import pytest

from rlhf_workflow.config import load_config
from rlhf_workflow.models.tiny import InitModelConfig, init_model, train_tokenizer
from rlhf_workflow.sandbox import MakeDataConfig, corpus, make_data


@pytest.fixture(scope="session", autouse=True)
def _session_token_cache(tmp_path_factory):
    """The token cache of session- and module-scoped fixtures: a temporary folder, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_TOKEN_CACHE", str(tmp_path_factory.mktemp("token-cache")))
        yield


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    """Each test its own empty token cache (torchrun runs inherit it)."""
    monkeypatch.setenv("RLHF_TOKEN_CACHE", str(tmp_path_factory.mktemp("token-cache")))


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


def judge_config(kind: str, tiny_model, sandbox_data, out, *overrides):
    """A fast BT (``kind="rm"``) or PM (``"pm"``) training config on the sandbox pairs."""
    from rlhf_workflow.reward.bt import RMConfig
    from rlhf_workflow.reward.pm import PMConfig

    cls, length = (RMConfig, 128) if kind == "rm" else (PMConfig, 256)
    return load_config(cls, None, [
        f"model.path={tiny_model}", f"data.train={sandbox_data / 'prefs_train.jsonl'}",
        f"data.test={sandbox_data / 'prefs_test.jsonl'}", f"data.max_length={length}",
        "optim.lr=1e-3", "train.global_batch_size=16", "train.micro_batch_size=16", "train.epochs=1",
        f"train.output_dir={out}", "train.progress=false", "train.log_every=5",
        "train.eval_every=0", *overrides])


@pytest.fixture
def judge_cfg(tiny_model, sandbox_data):
    """``judge_cfg(kind, out, *overrides)``: :func:`judge_config` on the session's model and data."""
    return lambda kind, out, *overrides: judge_config(kind, tiny_model, sandbox_data, out, *overrides)


@pytest.fixture(scope="session")
def trained_rm(tiny_model, sandbox_data, tmp_path_factory):
    """A BT reward model trained briefly on the sandbox pairs (shared by all test folders)."""
    from rlhf_workflow.reward.bt import run_rm_train

    return run_rm_train(judge_config("rm", tiny_model, sandbox_data, tmp_path_factory.mktemp("rm")))


@pytest.fixture(scope="session")
def trained_pm(tiny_model, sandbox_data, tmp_path_factory):
    """A pairwise preference model trained briefly on the sandbox pairs."""
    from rlhf_workflow.reward.pm import run_pm_train

    return run_pm_train(judge_config("pm", tiny_model, sandbox_data, tmp_path_factory.mktemp("pm")))
