"""Atomic writes: a failed write leaves the old file; folders are replaced whole; what a killed
process left is recognised and removed; a full disk is one line."""

import errno
import json
import os

import pytest

from rlhf_workflow import io
from rlhf_workflow.errors import UserError


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.jsonl"
    io.write_jsonl(path, [{"x": 1}])
    with pytest.raises(RuntimeError):
        with io.atomic_open(path) as f:
            f.write('{"x": 2}\n')
            raise RuntimeError("killed mid-write")
    assert path.read_text() == '{"x": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]


def test_a_full_disk_is_one_line_and_the_old_file_stays(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    io.write_json(path, {"v": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match=r"cannot write .*metrics.json: No space left on device \(earlier files"):
        io.write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1} and len(list(tmp_path.iterdir())) == 1


def test_jsonl_keeps_line_separators_inside_strings(tmp_path):
    text = "a\u2028b\u0085c\nd"
    io.write_jsonl(tmp_path / "r.jsonl", [{"t": text}, {"t": "e"}])
    lines = (tmp_path / "r.jsonl").read_text().split("\n")
    assert [json.loads(x)["t"] for x in lines if x] == [text, "e"]


def test_replace_dir_and_stale_temporaries(tmp_path):
    out, new = tmp_path / "model", tmp_path / ".model.tmp"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    io.replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not new.exists()
    # what a killed run leaves: temporary files and folders, and a folder moved aside
    for name in (".a.jsonl.x1y2.tmp", ".model.tmp", ".model.old"):
        (tmp_path / name).mkdir() if "model" in name else (tmp_path / name).write_text("half")
    (tmp_path / "keep.tmp").write_text("a user's file")
    assert io.remove_stale_temporaries(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp", "model"]


def test_files_and_model_folders_get_the_users_umask(tmp_path):
    """As ``open()`` and ``mkdir`` would: a colleague in the group can read what a run wrote."""
    from rlhf_workflow.cli import main

    old = os.umask(0o027)
    io.umask.cache_clear()
    try:
        io.write_json(tmp_path / "a.json", {"v": 1})
        assert main(["init-model", f"out={tmp_path / 'model'}", "vocab_size=300", "hidden_size=16",
                     "num_layers=1"]) == 0
    finally:
        os.umask(old)
        io.umask.cache_clear()
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()} == {0o640}
