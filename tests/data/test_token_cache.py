"""The token cache: a second run reads it (and trains to the same weights), any change to the
data, tokenizer or settings is tokenized again, the cached examples are those tokenizing
directly gives, a crash leaves nothing that looks complete, and 2 ranks write the very
files one process writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_workflow.config import load_config
from rlhf_workflow.data import chat, readers
from rlhf_workflow.data.chat import Tokenized
from rlhf_workflow.data.pairs import tokenize_pair
from rlhf_workflow.data.readers import read_records
from rlhf_workflow.data.records import PreferencePair, SFTExample
from rlhf_workflow.data.token_cache import Lazy, cache_root, tokenize_cached
from rlhf_workflow.errors import UserError
from rlhf_workflow.models.loading import load_tokenizer
from rlhf_workflow.reward import pm
from rlhf_workflow.reward.bt import run_rm_train
from rlhf_workflow.reward.pm import run_pm_train
from rlhf_workflow.training.dpo import DPOConfig, run_dpo, tokenize_dpo_pairs
from rlhf_workflow.training.sft import SFTConfig, run_sft, tokenize_cached_sft, tokenize_sft


def _dpo_cfg(tiny_model, data, out, *extra):
    return load_config(DPOConfig, None, [
        f"model.path={tiny_model}", f"data.train={data}", "data.max_length=96", "optim.lr=1e-3",
        "optim.warmup_ratio=0", "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=8",
        f"train.output_dir={out}", "train.progress=false", *extra])


def _sft_cfg(tiny_model, sandbox_data, out, *extra):
    return load_config(SFTConfig, None, [
        f"model.path={tiny_model}", f"data.train={sandbox_data / 'sft.jsonl'}", "data.max_length=64",
        "optim.lr=1e-3", "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=8",
        f"train.output_dir={out}", "train.progress=false", *extra])


def _folders() -> list[Path]:
    return sorted(cache_root().iterdir()) if cache_root().exists() else []


def _no_tokenizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(chat, "render", refuse)


# --------------------------------------------------------------------------- a second run


def test_a_second_dpo_run_reads_the_cache_and_trains_to_the_same_weights(
        tiny_model, sandbox_data, tmp_path, monkeypatch, capsys):
    data = sandbox_data / "prefs_train.jsonl"
    run_dpo(_dpo_cfg(tiny_model, data, tmp_path / "a"))
    assert "dpo: 400 pairs tokenized on 1 process(es)" in capsys.readouterr().out
    (folder,) = _folders()
    _no_tokenizing(monkeypatch)
    monkeypatch.setattr(readers, "iter_rows", lambda *a, **k: pytest.fail("records read on a cache hit"))
    run_dpo(_dpo_cfg(tiny_model, data, tmp_path / "b"))
    assert f"dpo: 400 pairs tokenized, read from {folder}" in capsys.readouterr().out
    a, b = ((tmp_path / run / "model" / "model.safetensors").read_bytes() for run in "ab")
    assert a == b


def test_a_second_sft_run_reads_the_cache_and_trains_to_the_same_weights(
        tiny_model, sandbox_data, tmp_path, monkeypatch, capsys):
    run_sft(_sft_cfg(tiny_model, sandbox_data, tmp_path / "a"))
    _no_tokenizing(monkeypatch)
    run_sft(_sft_cfg(tiny_model, sandbox_data, tmp_path / "b"))
    assert "conversations tokenized, read from" in capsys.readouterr().out
    a, b = ((tmp_path / run / "model" / "model.safetensors").read_bytes() for run in "ab")
    assert a == b


@pytest.mark.parametrize("kind", ["rm", "pm"])
def test_a_second_judge_run_reads_the_cache_and_trains_to_the_same_weights(
        kind, judge_cfg, tmp_path, monkeypatch, capsys):
    run = run_rm_train if kind == "rm" else run_pm_train
    extra = ["train.max_steps=2", "data.test=null", "data.eval_fraction=0.1"]  # held out from train
    run(judge_cfg(kind, tmp_path / "a", *extra))
    first = capsys.readouterr().out
    assert len(_folders()) == (2 if kind == "rm" else 1)  # (the RM caches its held-out pairs too)
    if kind == "rm":
        _no_tokenizing(monkeypatch)
    else:  # (its label check and held-out evaluation render templates: refuse training comparisons)
        monkeypatch.setattr(pm, "encode_training_comparison", lambda *a, **k: pytest.fail("tokenized again"))
    run(judge_cfg(kind, tmp_path / "b", *extra))
    second = capsys.readouterr().out
    assert "tokenized, read from" in second and "tokenized on 1 process(es)" in first
    summary = [line for line in first.splitlines() if "held out; truncated" in line]
    assert summary and summary[0] in second  # the same counts
    a, b = ((tmp_path / r / "model" / "model.safetensors").read_bytes() for r in "ab")
    assert a == b


# --------------------------------------------------------------------------- the key and the contents


def test_a_changed_setting_data_or_tokenizer_is_tokenized_again(tiny_model, sandbox_data, tmp_path, capsys):
    tok = load_tokenizer(load_config(DPOConfig, None, [f"model.path={tiny_model}"]).model)
    data = sandbox_data / "prefs_train.jsonl"
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    changed = tmp_path / "changed.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    changed.write_text("".join(lines[:-1]))

    def tokenize(path, *extra, tokenizer=tok) -> str:
        tokenize_dpo_pairs(_dpo_cfg(tiny_model, path, tmp_path / "out", *extra), tokenizer)
        return capsys.readouterr().out

    assert "tokenized on 1 process(es)" in tokenize(data)
    assert "read from" in tokenize(data)
    assert "read from" in tokenize(copy)  # the data is its bytes, not its path
    assert "read from" in tokenize(data, "data.share_prompt=false", "optim.lr=1")  # not tokenization settings
    assert len(_folders()) == 1
    for extra in (["data.max_length=64"], ["data.max_prompt_length=16"], ["data.on_long=error"]):
        assert "tokenized on" in tokenize(data, *extra)
    assert "tokenized on" in tokenize(changed)
    tok.add_special_tokens({"pad_token": "<|new-pad|>"})  # another vocabulary
    assert "tokenized on" in tokenize(data)
    assert len(_folders()) == 6
    assert "read from" in tokenize(data, "data.max_length=64", tokenizer=load_tokenizer(
        load_config(DPOConfig, None, [f"model.path={tiny_model}"]).model))
    assert not [p for p in cache_root().iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("enabled", [True, False])
def test_cached_pairs_equal_tokenizing_directly(enabled, tokenizer, sandbox_data, tmp_path, capsys):
    """Tight lengths: some prompts cut, some pairs skipped; the view gives the very objects."""
    data = sandbox_data / "prefs_train.jsonl"
    cfg = _dpo_cfg("unused", data, tmp_path, "data.max_length=24", "data.max_prompt_length=12",
                   f"data.token_cache={enabled}")
    direct = [tokenize_pair(tokenizer, r, 24, 12) for r in read_records(data, PreferencePair)]
    kept = [p for p in direct if p is not None]
    for _ in range(2):  # built, then read
        cache = tokenize_dpo_pairs(cfg, tokenizer)
        pairs = cache.pairs()
        assert len(pairs) == len(kept) and cache.skipped == direct.count(None) > 0
        assert list(pairs) == kept and sum(p.truncated for p in kept) > 0
        assert [p.shared_prefix for p in pairs] == [p.shared_prefix for p in kept]
        assert cache.lengths().sum(1).tolist() == [len(p) for p in kept]
        got = pairs[-1].chosen
        assert type(got.input_ids[0]) is int and type(got.loss_mask[0]) is bool
    assert len(_folders()) == (1 if enabled else 0)
    assert ("read from" in capsys.readouterr().out) == enabled


def test_cached_sft_conversations_equal_tokenizing_directly(tokenizer, sandbox_data, tmp_path):
    cfg = _sft_cfg("unused", sandbox_data, tmp_path, "data.max_length=40")
    examples = read_records(cfg.data.train, SFTExample)
    seqs, dropped = tokenize_sft(tokenizer, examples, 40, "all")
    cache = tokenize_cached_sft(cfg, tokenizer)
    assert len(cache) == len(seqs) and cache.skipped == dropped
    assert [(t.input_ids, t.targets()) for t in map(cache.tokenized, range(len(cache)))] == seqs
    assert cache.lengths()[:, 0].tolist() == [len(ids) for ids, _ in seqs]
    assert any(len(ids) == 40 for ids, _ in seqs)  # some were truncated


def _toy(records, fail_at=None, error=RuntimeError):
    def encode(i, n):
        if i == fail_at:
            raise error(f"record {i + 1} is bad")
        if n == 0:
            return None
        return (Tokenized(list(range(n)), [k % 2 == 1 for k in range(n)]),), {"n": n}

    return tokenize_cached("toy", (str(records), "train"), {}, None, records, encode, ("n",), progress=False)


def test_a_crash_while_tokenizing_leaves_no_cache_and_the_view_is_a_sequence(tmp_path, monkeypatch):
    monkeypatch.setattr("rlhf_workflow.data.token_cache.tokenizer_identity", lambda tok: {})
    records = [3, 0, 5, 1, 2]
    for error in (RuntimeError, UserError):
        with pytest.raises(error, match="record 4 is bad"):
            _toy(records, fail_at=3, error=error)
        assert _folders() == []
    cache = _toy(records)
    assert len(cache) == 4 and cache.skipped == 1 and cache.field("n").tolist() == [3, 5, 1, 2]
    assert cache.tokenized(1) == Tokenized([0, 1, 2, 3, 4], [False, True, False, True, False])
    assert cache.input_ids(-1) == [0, 1] and cache.input_ids(2) == [0]
    view = Lazy(len(cache), cache.input_ids)
    assert list(view) == [[0, 1, 2], [0, 1, 2, 3, 4], [0], [0, 1]]
    assert view[-1] == [0, 1] and view[1:3] == [[0, 1, 2, 3, 4], [0]]
    with pytest.raises(IndexError):
        view[4]
    meta = json.loads((_folders()[0] / "meta.json").read_text())
    assert meta["records"] == 5 and meta["examples"] == 4 and meta["skipped"] == 1


# --------------------------------------------------------------------------- two ranks


def _torchrun(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rlhf_workflow.cli", "dpo", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RLHF_TOKEN_CACHE": str(cache)})


def test_two_ranks_write_the_same_cache_as_one_process(tiny_model, sandbox_data, tmp_path, monkeypatch):
    """Tight lengths, so that both ranks' blocks skip and cut pairs."""
    data = sandbox_data / "prefs_train.jsonl"
    args = ["data.max_length=24", "data.max_prompt_length=12", "loss.kind=simpo", "train.max_steps=1"]
    monkeypatch.setenv("RLHF_TOKEN_CACHE", str(tmp_path / "one"))
    run_dpo(_dpo_cfg(tiny_model, data, tmp_path / "run1", *args))
    done = _torchrun(_dpo_args(tiny_model, data, tmp_path / "run2") + args, tmp_path / "two")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "pairs tokenized on 2 process(es)" in done.stdout
    assert json.loads((tmp_path / "run2" / "train_plan.json").read_text())["processes"] == 2
    (one,), (two,) = (sorted((tmp_path / d).iterdir()) for d in ("one", "two"))  # no temporaries left
    assert one.name == two.name
    files = sorted(p.name for p in one.glob("*.npy"))
    assert files == ["ids.npy", "mask.npy", "offsets.npy", "prefix.npy", "truncated.npy"]
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    meta1, meta2 = (json.loads((d / "meta.json").read_text()) for d in (one, two))
    assert meta1 == meta2 and meta1["skipped"] > 0


def test_a_bad_pair_in_the_second_rank_block_fails_every_rank_with_one_process_message(
        tiny_model, sandbox_data, tmp_path):
    rows = (sandbox_data / "prefs_train.jsonl").read_text().splitlines()[:12]
    bad = json.loads(rows[9])
    rows[9] = json.dumps({**bad, "chosen": "five " * 200})
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(rows) + "\n")
    done = _torchrun(_dpo_args(tiny_model, data, tmp_path / "run") + ["data.on_long=error"], tmp_path / "cache")
    assert done.returncode != 0
    assert f"{data}, line 10: a response does not fit" in done.stdout + done.stderr
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def _dpo_args(tiny_model, data, out) -> list[str]:
    return [f"model.path={tiny_model}", f"data.train={data}", "data.max_length=96", "optim.lr=1e-3",
            "train.global_batch_size=8", "train.micro_batch_size=4", f"train.output_dir={out}",
            "train.progress=false"]
