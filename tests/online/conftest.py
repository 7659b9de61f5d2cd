"""Tiny annotators for the online-loop tests: a BT reward model and a preference model."""

import pytest

from rlhf_workflow.config import load_config
from rlhf_workflow.reward.bt import RMTrainConfig, run_rm_train
from rlhf_workflow.reward.pm import PMTrainConfig, run_pm_train


def _pair_args(tiny_model, sandbox_data, out):
    return [f"model.path={tiny_model}", f"data.train={sandbox_data / 'prefs_train.jsonl'}",
            f"data.test={sandbox_data / 'prefs_test.jsonl'}", "optim.lr=1e-3", f"train.output_dir={out}",
            "train.max_steps=4", "train.micro_batch_size=8", "train.grad_accum=1", "train.progress=false"]


@pytest.fixture(scope="session")
def reward_model(tiny_model, sandbox_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    return run_rm_train(load_config(RMTrainConfig, None, [*_pair_args(tiny_model, sandbox_data, out),
                                                          "data.max_length=128"]))


@pytest.fixture(scope="session")
def preference_model(tiny_model, sandbox_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pm")
    return run_pm_train(load_config(PMTrainConfig, None, [*_pair_args(tiny_model, sandbox_data, out),
                                                          "data.max_length=256"]))
