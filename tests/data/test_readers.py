import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_workflow.data.readers import iter_records, read_records
from rlhf_workflow.data.records import PreferencePair, Prompt, SFTExample
from rlhf_workflow.errors import UserError


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_all_formats_parse(tmp_path):
    conv = [{"role": "user", "content": "2+2?"}]
    f = _write(tmp_path / "p.jsonl", [
        {"prompt": "flat", "chosen": "a", "rejected": "b", "subset": "math-prm", "extra": 1},
        {"prompt": conv, "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": conv + [{"role": "assistant", "content": "5"}]},
    ])
    flat, chat = read_records(f, PreferencePair)
    assert flat.subset == "math-prm"
    assert flat.conversations() == ([{"role": "user", "content": "flat"}],
                                    [{"role": "assistant", "content": "a"}],
                                    [{"role": "assistant", "content": "b"}])
    # a response repeating the prompt messages in front is reduced to the assistant turn
    assert chat.conversations()[2] == [{"role": "assistant", "content": "5"}]
    prompts = read_records(_write(tmp_path / "q.jsonl", [{"prompt": "hi", "id": "x", "meta": {"a": 1}}, {"prompt": conv}]), Prompt)
    assert prompts[0].messages() == [{"role": "user", "content": "hi"}] and prompts[1].messages() == conv


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"prompt": "a", "chosen": "b"', "line 2: not valid JSON"),
        ({"prompt": "a", "chosen": "b"}, "line 2: field 'rejected': Field required"),
        ({"prompt": "a", "chosen": 5, "rejected": "c"}, "line 2: field 'chosen"),
        ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "b", "rejected": "c"},
         "line 2: field 'prompt"),
        ('[1, 2]', "line 2: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, row, message):
    f = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, row])
    with pytest.raises(UserError) as e:
        read_records(f, PreferencePair)
    assert str(e.value).startswith(str(f)) and message in str(e.value)


def test_sft_needs_an_assistant_turn(tmp_path):
    f = _write(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match="line 1: field 'messages': needs at least one assistant"):
        read_records(f, SFTExample)


def test_parquet_and_missing_files(tmp_path):
    table = pa.table({"prompt": ["a", "b"], "id": ["1", "2"]})
    pq.write_table(table, tmp_path / "p.parquet")
    assert [p.id for p in read_records(tmp_path / "p.parquet", Prompt)] == ["1", "2"]
    with pytest.raises(UserError, match="data file not found"):
        read_records(tmp_path / "missing.jsonl", Prompt)
    with pytest.raises(UserError, match="not a hub dataset name"):
        read_records("no_such_thing", Prompt)


def test_records_are_streamed(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"prompt": "ok"}, '{"broken'])
    it = iter_records(f, Prompt)
    assert next(it).prompt == "ok"  # the first record arrives before the bad line is read
    with pytest.raises(UserError):
        next(it)
