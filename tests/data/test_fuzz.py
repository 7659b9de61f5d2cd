"""Property-based fuzzing of what reads user input: whatever a record file or a command-line
override holds, the readers give valid records or one ``UserError``, never another exception."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_workflow.config import load_config
from rlhf_workflow.data.readers import iter_records, read_pairs
from rlhf_workflow.data.records import PreferencePair, Prompt, Rollout, SFTExample
from rlhf_workflow.errors import UserError
from rlhf_workflow.online.loop import LoopConfig

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["prompt", "chosen", "rejected", "messages", "responses", "rewards", "role", "content",
                        "id", "meta", "subset"])
records = st.dictionaries(keys, json_values | st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "bot"]), "content": json_values}), max_size=3),
    max_size=5)
lines = st.lists(st.one_of(records.map(json.dumps), st.text(max_size=30).filter(lambda s: "\n" not in s)),
                 min_size=1, max_size=6)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(lines=lines, bom=st.booleans())
def test_record_files_give_records_or_one_user_error(tmp_path, lines, bom):
    path = tmp_path / "data.jsonl"
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    for kind in (SFTExample, Prompt, PreferencePair, Rollout):
        try:
            got = list(iter_records(path, kind))
        except UserError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e)
            continue
        assert all(isinstance(r, kind) for r in got)
    try:
        rows, skipped = read_pairs(str(path), on_bad="skip")
    except UserError as e:
        assert "no valid preference pairs" in str(e)
        return
    assert len(rows) + sum(skipped.values()) == sum(1 for x in lines if x.strip())


dotted = st.lists(st.sampled_from(["iterations", "seed", "generate", "sampling", "n", "dpo", "train", "lr", "optim",
                                   "x", "strategy", "global_batch_size", "data", "max_length", "prompts"]),
                  min_size=1, max_size=3).map(".".join)
values = st.one_of(st.text(max_size=12), st.integers().map(str), st.floats().map(str),
                   st.sampled_from(["true", "[1, 2]", "{a: 1}", "null", "-", "1e-5", ": x", "'", "[", "fsdp"]))


@FAST
@given(overrides=st.lists(st.one_of(st.tuples(dotted, values).map("=".join), st.text(max_size=15)), max_size=4))
def test_overrides_give_a_config_or_one_user_error(overrides):
    try:
        cfg = load_config(LoopConfig, None, overrides)
    except UserError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert isinstance(cfg, LoopConfig)
