import pytest

from rlhf_workflow.config import describe_options, load_config, save_config
from rlhf_workflow.errors import UserError
from rlhf_workflow.training.sft import SFTConfig


def test_defaults_are_the_papers():
    cfg = load_config(SFTConfig)
    assert cfg.optim.lr == 2e-5 and cfg.optim.warmup_ratio == 0.05
    assert cfg.optim.scheduler == "cosine" and cfg.train.epochs == 3


def test_yaml_then_overrides_later_wins(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.001\ntrain:\n  epochs: 2\n")
    cfg = load_config(SFTConfig, f, ["optim.lr=3e-4", "data.packing=false"])
    assert cfg.optim.lr == 3e-4 and cfg.train.epochs == 2 and cfg.data.packing is False
    # setting one key of a section keeps the stage's defaults for the rest of it
    assert cfg.train.output_dir == "runs/sft" and cfg.optim.warmup_ratio == 0.05


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; valid keys at optim: lr, weight_decay"),
        ("nope=1", "valid keys at top level: model, data, optim, train"),
        ("optim.scheduler=foo", "'optim.scheduler': Input should be 'cosine', 'linear' or 'constant'"),
        ("train.epochs=abc", "'train.epochs': Input should be a valid number"),
        ("optim.lr=-1", "'optim.lr': Input should be greater than 0"),
        ("optim.lr", "is not of the form key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, expected):
    with pytest.raises(UserError) as e:
        load_config(SFTConfig, None, [override])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_yaml_names_valid_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(UserError, match="unknown config key 'optim.learning_rate'; valid keys here: lr"):
        load_config(SFTConfig, f)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "none.yaml")
    f = tmp_path / "c.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(SFTConfig, f)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(SFTConfig, None, ["optim.lr=1e-3", "train.report_to=[tensorboard]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(SFTConfig, tmp_path / "config.yaml") == cfg


def test_help_rows_show_stage_defaults():
    rows = {k: d for k, d, _ in describe_options(SFTConfig)}
    assert rows["train.output_dir"] == "'runs/sft'" and rows["optim.lr"] == "2e-05"


def test_mixed_precision_no_unquoted_on_the_command_line_and_in_yaml(tmp_path):
    """YAML reads a bare ``no`` as false; the documented value must still work both ways."""
    assert load_config(SFTConfig, overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\n")
    assert load_config(SFTConfig, f).train.mixed_precision == "no"
    with pytest.raises(UserError, match="mixed_precision"):
        load_config(SFTConfig, overrides=["train.mixed_precision=yes"])


def test_the_demo_dpo_judge_needs_a_loss_whose_reward_it_reads():
    from rlhf_workflow.demo import DemoConfig

    assert load_config(DemoConfig, None, ["dpo_judge.loss.kind=hinge"]).judge == "dpo"  # the default
    assert load_config(DemoConfig, None, ["judge=bt", "dpo_judge.loss.kind=simpo"]).judge == "bt"  # (not used)
    for bad in (["dpo_judge.loss.kind=simpo"], ["dpo_judge.loss.average_logps=true"]):
        with pytest.raises(UserError, match="dpo_judge.loss.kind must be sigmoid or hinge"):
            load_config(DemoConfig, None, bad)
