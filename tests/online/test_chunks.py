"""Chunked stages: chunk i goes to rank i % world, parts join in order, a missing part is an error."""

import json

import pytest

from rlhf_workflow.online.chunks import (
    count_records,
    join_parts,
    parts_dir,
    process_chunks,
    start_parts,
)


def test_chunks_are_dealt_round_robin_and_joined_in_order(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [{"i": i} for i in range(11)]
    assert start_parts(out, {"setting": 1}, rank=0)
    seen = {0: [], 1: []}
    for rank in (1, 0):  # two ranks, each on its own chunks of the same stream
        n = process_chunks(iter(records), out, 3, rank, 2, lambda i, batch, r=rank: seen[r].append(i) or batch, "t")
        assert n == 4
    assert seen == {0: [0, 2], 1: [1, 3]}
    join_parts(out, 4)
    assert [json.loads(x) for x in out.read_text().splitlines()] == records and not parts_dir(out).exists()
    assert not start_parts(out, {"setting": 1}, rank=0)  # done: nothing to do


def test_a_missing_part_is_an_error_and_counts_are_cheap(tmp_path):
    out = tmp_path / "out.jsonl"
    start_parts(out, {}, rank=0)
    process_chunks(iter([{"i": 0}] * 5), out, 2, 0, 2, lambda i, b: b, "t")  # rank 1 never ran
    with pytest.raises(RuntimeError, match=r"chunks \[1\] are missing"):
        join_parts(out, 3)
    (tmp_path / "r.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert count_records(tmp_path / "r.jsonl") == 2 and count_records("org/dataset") is None
