"""`rlhf loop` end to end on tiny models: files, resume after failures, config changes, prompt slices."""

import json
import math
import re
import sys
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file

from rlhf_workflow.config import ModelConfig, load_config
from rlhf_workflow.data.readers import read_records
from rlhf_workflow.data.records import Prompt
from rlhf_workflow.errors import UserError
from rlhf_workflow.evaluation.iteration import sample_logps
from rlhf_workflow.generation.hf import generate_hf
from rlhf_workflow.generation.sampling import SamplingConfig
from rlhf_workflow.io import write_jsonl
from rlhf_workflow.models.loading import load_model, load_tokenizer
from rlhf_workflow.online import generate as generate_module
from rlhf_workflow.online.chunks import locked
from rlhf_workflow.online.loop import (
    LoopConfig,
    PromptPoolConfig,
    _check_pool,
    _slice_prompts,
    run_loop,
)
from rlhf_workflow.reward.bt import load_reward_model, score

FILES = ["prompts.jsonl", "rollouts.jsonl", "scored.jsonl", "pairs.jsonl", "metrics.json"]


def _jsonl(path):
    """Records of a JSON Lines file. Not str.splitlines(): generated text may hold U+2028 or
    U+0085, which JSON writes unescaped and splitlines() would break a record at."""
    return [json.loads(x) for x in path.read_text().split("\n") if x]


@pytest.fixture(scope="module")
def full_run(loop_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("loop") / "full"
    summary = run_loop(loop_cfg(out))
    return out, summary


def test_two_iterations_end_to_end(full_run, sandbox_data, trained_rm):
    out, summary = full_run
    assert [r["iteration"] for r in summary["iterations"]] == [0, 1, 2]
    for t in (1, 2):
        d = out / f"iter_{t}"
        assert all((d / f).exists() for f in FILES) and (d / "dpo" / "model" / "model.safetensors").exists()
        prompts = [x["id"] for x in _jsonl(d / "prompts.jsonl")]
        scored = _jsonl(d / "scored.jsonl")
        assert [s["id"] for s in scored] == prompts and all(len(s["rewards"]) == 3 for s in scored)
    ids1 = set((out / "iter_1" / "prompts.jsonl").read_text().splitlines())
    ids2 = set((out / "iter_2" / "prompts.jsonl").read_text().splitlines())
    assert len(ids1) == 8 and not ids1 & ids2  # fresh, disjoint prompts per iteration
    rows = summary["iterations"]
    # KL(pi_2 || pi_0) as the loop reports it: recomputed here from the two saved models, on the
    # evaluation's own samples (its prompts, its sampling settings, the loop's seed)
    prompts = [p.messages() for p in read_records(sandbox_data / "prompts_eval.jsonl", Prompt)[:6]]
    policy, sft = (load_model(ModelConfig(path=rows[k]["policy"])) for k in (2, 0))
    tok = load_tokenizer(ModelConfig(path=rows[0]["policy"]))
    samples = generate_hf(policy, tok, prompts, SamplingConfig(n=2, max_new_tokens=10, seed=42), progress=False)
    flat_p = [p for p, g in zip(prompts, samples, strict=True) for _ in g]
    flat_s = [s for g in samples for s in g]
    ratios = [a - b for a, b in zip(sample_logps(policy, tok, flat_p, flat_s), sample_logps(sft, tok, flat_p, flat_s),
                                    strict=True)]
    assert rows[2]["kl"] == pytest.approx(sum(ratios) / len(ratios), abs=1e-5) and any(abs(r) > 1e-3 for r in ratios)
    assert {"gold_reward", "rm_reward", "eos_rate", "mean_tokens"} <= rows[2].keys()
    # the gold figures from each prompt's gold rewards: the mean, and the difference to SFT's paired by prompt
    gold = {t: _jsonl(out / f"iter_{t}" / "eval_gold.jsonl") for t in (0, 2)}
    assert [g["id"] for g in gold[2]] == [g["id"] for g in gold[0]] and len(gold[2]) == 6
    assert rows[2]["gold_reward"] == pytest.approx(sum(sum(g["gold"]) for g in gold[2]) / 12)
    diffs = [(sum(a["gold"]) - sum(b["gold"])) / 2 for a, b in zip(gold[2], gold[0], strict=True)]
    assert rows[2]["gold_vs_baseline"] == pytest.approx(sum(diffs) / 6)
    assert "gold_vs_baseline" not in rows[0]
    # the held-out samples keep the judge's reward of each (rm_reward is their mean), and the win
    # rate against SFT is the mean of sigmoid(r_policy - r_sft) from them, sample k against sample k
    held = {t: _jsonl(out / f"iter_{t}" / "eval_samples.jsonl") for t in (0, 2)}
    rm, rm_tok = load_reward_model(trained_rm, "fp32")
    texts = [r for row in held[2] for r in row["responses"]]
    assert [x for row in held[2] for x in row["rewards"]] == pytest.approx(
        score(rm, rm_tok, [prompts[i // 2] for i in range(12)], texts, max_length=256, progress=False), abs=1e-5)
    assert rows[2]["rm_reward"] == pytest.approx(sum(x for row in held[2] for x in row["rewards"]) / 12)
    prefs = [1 / (1 + math.exp(b - a)) for pa, pb in zip(held[2], held[0], strict=True)
             for a, b in zip(pa["rewards"], pb["rewards"], strict=True)]
    assert rows[2]["win_rate"] == pytest.approx(sum(prefs) / 12) and "win_rate" not in rows[0]
    state = json.loads((out / "state.json").read_text())["completed"]
    assert len(state) == 1 + 2 * 6
    table = (out / "summary.md").read_text()
    assert table.count("\n") == 5 and "KL to SFT" in table
    cfg = (out / "iter_2" / "dpo" / "config.yaml").read_text()
    assert f"reference:\n  path: {rows[0]['policy']}" in cfg  # reference = the SFT model, written down


def test_resume_after_failures_gives_the_same_files(full_run, loop_cfg,
                                                    tmp_path, monkeypatch):
    full, _ = full_run
    out = tmp_path / "crashy"
    cfg = loop_cfg(out)
    # a failure inside a stage: the second chunk of iteration 1's generation
    real, calls = generate_module.rollout_records, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("mid-generate")
        return real(*args)

    monkeypatch.setattr(generate_module, "rollout_records", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_loop(cfg)
    monkeypatch.setattr(generate_module, "rollout_records", real)
    # then failures between stages
    for crash_after in ("iter_1/generate", "iter_1/dpo", "iter_2/annotate"):
        def boom(key, crash_after=crash_after):
            if key == crash_after:
                raise KeyboardInterrupt(key)
        with pytest.raises(KeyboardInterrupt):
            run_loop(cfg, after_stage=boom)
    run_loop(cfg)
    for t in (1, 2):
        for f in FILES:
            a, b = (full / f"iter_{t}" / f).read_text(), (out / f"iter_{t}" / f).read_text()
            if f == "metrics.json":
                a, b = json.loads(a), json.loads(b)
                a.pop("policy"), b.pop("policy")
            assert a == b, f"iter_{t}/{f}"
    wa = load_file(full / "iter_2" / "dpo" / "model" / "model.safetensors")
    wb = load_file(out / "iter_2" / "dpo" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_changed_config_on_resume_is_an_error(full_run, loop_cfg, sandbox_data):
    full, _ = full_run
    cfg = loop_cfg(full, "select.strategy=max_max", "dpo.optim.lr=5e-4")
    with pytest.raises(UserError, match=r"2 keys differ: dpo.optim.lr, select.strategy\); use --force"):
        run_loop(cfg)
    # a moved run directory, or a path written with a trailing slash, is the same run
    same = loop_cfg(str(full) + "/",
                f"eval.prompts={sandbox_data / 'prompts_eval.jsonl'}/")
    assert len(run_loop(same)["iterations"]) == 3
    twelve = [f"dpo.train.{k}=3" for k in ("max_steps", "eval_every", "log_every", "save_every", "keep_checkpoints",
                                           "micro_batch_size", "seed")] + [
        "dpo.optim.lr=1e-5", "dpo.optim.eps=1e-6", "dpo.loss.beta=0.3", "select.min_margin=0.1", "iterations=3"]
    with pytest.raises(UserError, match=r"12 keys differ: .* and 2 more\); use --force"):
        run_loop(loop_cfg(full, *twelve))
    forced = loop_cfg(full, "select.strategy=max_max", "force=true")
    assert len(run_loop(forced)["iterations"]) == 3  # everything done already: nothing recomputed


def test_a_folder_of_another_command_is_not_a_loop_run(loop_cfg, tmp_path):
    other = tmp_path / "dpo"
    other.mkdir()
    (other / "config.yaml").write_text("model: {path: x}\nreference: null\n")
    with pytest.raises(UserError, match="is not a loop run directory"):
        run_loop(loop_cfg(other))


def test_prompt_slices_stream_a_large_pool(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_jsonl(pool, ({"prompt": f"question {i}", "id": f"q{i}"} for i in range(100_000)))
    run = tmp_path / "run"
    cfg = load_config(LoopConfig, None, [f"prompts.source={pool}", "prompts.per_iteration=50", "seed=3", f"out={run}"])
    tracemalloc.start()
    n = _check_pool(cfg.prompts, run)
    _slice_prompts(cfg, 1, tmp_path / "a.jsonl", n)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 100_000 and peak < 16 * 2**20  # the pool (~100k records, ~50 MB as objects) is never held;
    # what is: the sha256 read buffer (8 MB) and 8 bytes a prompt
    _slice_prompts(cfg, 2, tmp_path / "b.jsonl", n)
    a = (tmp_path / "a.jsonl").read_text().splitlines()
    b = (tmp_path / "b.jsonl").read_text().splitlines()
    assert len(a) == len(b) == 50 and not set(a) & set(b)
    _slice_prompts(cfg, 1, tmp_path / "a2.jsonl", n)
    assert (tmp_path / "a2.jsonl").read_text().splitlines() == a  # seeded
    cfg.prompts.per_iteration = 60_000
    with pytest.raises(UserError, match="none left for iteration 3"):
        _slice_prompts(cfg, 3, tmp_path / "c.jsonl", n)
    with pool.open("a") as f:  # the pool changes between iterations: its slices would overlap
        f.write(json.dumps({"prompt": "one more", "id": "extra"}) + "\n")
    cfg.prompts.per_iteration = 50
    with pytest.raises(UserError, match="changed since the run's first iteration sliced it"):
        _slice_prompts(cfg, 3, tmp_path / "c.jsonl", n)


def test_a_pool_with_a_repeated_id_is_refused_naming_both_lines(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_jsonl(pool, [{"prompt": "a", "id": "p1"}, {"prompt": "b", "id": "7"}, {"prompt": "c"},
                       {"prompt": "d", "id": "p2"}, {"prompt": "e", "id": "p1"}])
    with pytest.raises(UserError, match=r"pool.jsonl, line 5: field 'id': 'p1' is also the id of line 1"):
        _check_pool(PromptPoolConfig(source=str(pool)), tmp_path / "run")
    write_jsonl(pool, [{"prompt": "a", "id": 7}, {"prompt": "b", "id": "7"}, {"prompt": "c"}, {"prompt": "d", "id": 7}])
    with pytest.raises(UserError, match=r"pool.jsonl, line 4: field 'id': 7 is also the id of line 1"):
        _check_pool(PromptPoolConfig(source=str(pool)), tmp_path / "run")
    write_jsonl(pool, [{"prompt": "a", "id": "p1"}, {"prompt": "b", "id": "7"}, {"prompt": "d", "id": 7}])
    assert _check_pool(PromptPoolConfig(source=str(pool)), tmp_path / "run2") == 3  # 7 and "7": two ids


TWO_NODES = """#!/usr/bin/env bash
# A launcher for two nodes on this machine: two torchrun agents on 127.0.0.1, node ranks 0 and 1,
# $1 processes each, then the stage's arguments; fails when either node fails.
n=$1; shift
port=$({python} -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
run() {{ {python} -m torch.distributed.run --nnodes 2 --node_rank $1 --nproc_per_node $n --master_addr 127.0.0.1 \
    --master_port $port "${{@:2}}"; }}
run 0 "$@" & first=$!
run 1 "$@"; second=$?
wait $first; exit $(( $? | second ))
"""


@pytest.mark.parametrize("launcher", ["default", "two nodes"])
def test_stages_on_two_processes(launcher, full_run, loop_cfg, tmp_path):
    """Every stage on 2 ranks: 2 processes by the default launcher (torchrun on this node), or
    one process on each of 2 nodes by a configured launcher (two torchrun agents on 127.0.0.1,
    as srun + torchrun start them on a cluster); the loop itself stays one process. Rollouts,
    rewards and pairs are the 1-process run's bytes, DPO (DDP, same global batch) its weights,
    and the evaluation (shared out over both ranks) its metrics."""
    full, _ = full_run
    out = tmp_path / "two"
    if launcher == "two nodes":
        script = tmp_path / "two_nodes.sh"
        script.write_text(TWO_NODES.format(python=sys.executable))
        extra = [f"launcher=[bash, {script}, '{{processes}}']", "processes=1"]
    else:
        extra = ["processes=2"]
    run_loop(loop_cfg(out, "iterations=1", *extra))
    for f in ("rollouts.jsonl", "scored.jsonl", "pairs.jsonl"):
        assert (out / "iter_1" / f).read_bytes() == (full / "iter_1" / f).read_bytes(), f
    assert (out / "iter_1" / "dpo.yaml").exists()  # the stage config the ranks read
    assert json.loads((out / "iter_1" / "dpo" / "train_plan.json").read_text())["processes"] == 2
    wa = load_file(full / "iter_1" / "dpo" / "model" / "model.safetensors")
    wb = load_file(out / "iter_1" / "dpo" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=1e-5)
    for t in (0, 1):
        got, want = (json.loads((d / f"iter_{t}" / "metrics.json").read_text()) for d in (out, full))
        assert got.pop("processes") == 2 and want.pop("processes") == 1
        assert got.pop("policy").replace(str(out), "") == want.pop("policy").replace(str(full), "")
        if t == 0:
            assert got == want
        else:  # (the 2-rank DPO weights differ from 1 rank's by float round-off: so may a sample)
            assert got.keys() == want.keys() and got["pairs"] == want["pairs"]


def test_on_a_gpu_machine_every_stage_is_a_process_of_its_own(full_run, loop_cfg, tmp_path, monkeypatch):
    """Where a GPU is visible the loop's own process holds none: even with processes=1 each stage
    (generation, annotation, DPO, the evaluation) runs in a child process that returns all of
    its memory when it ends, from the config file it wrote. Shown on the CPU by making the loop
    believe it has a GPU: the files and the metrics are the in-process run's."""
    from rlhf_workflow.online import loop as loop_module

    monkeypatch.setattr(loop_module, "_has_gpu", lambda: True)
    full, _ = full_run
    out = tmp_path / "isolated"
    run_loop(loop_cfg(out, "iterations=1"))
    for f in ("generate.yaml", "annotate.yaml", "dpo.yaml", "eval.yaml"):
        assert (out / "iter_1" / f).exists(), f  # what each child process read
    for f in ("rollouts.jsonl", "scored.jsonl", "pairs.jsonl"):
        assert (out / "iter_1" / f).read_bytes() == (full / "iter_1" / f).read_bytes(), f
    for t in (0, 1):
        got, want = (json.loads((d / f"iter_{t}" / "metrics.json").read_text()) for d in (out, full))
        assert got.pop("policy").replace(str(out), "") == want.pop("policy").replace(str(full), "")
        assert got == want


def test_held_out_evaluation_every_kth_iteration(loop_cfg, tmp_path, monkeypatch):
    """``eval.every=2`` over 5 iterations: the SFT policy, iterations 2 and 4 and the last on the
    held-out prompts; iterations 1 and 3 report their own rollouts only."""
    from rlhf_workflow.online import loop as loop_module

    held_out = {}
    monkeypatch.setattr(loop_module, "_launch", lambda cfg, command, stage_cfg, path, *a: held_out.update(
        {stage_cfg.iteration: stage_cfg.eval.prompts is not None}))
    cfg = loop_cfg(tmp_path, "iterations=5", "eval.every=2")
    for t in range(6):
        loop_module._evaluate(cfg, t, "policy", "sft", tmp_path / f"iter_{t}")
    assert held_out == {0: True, 1: False, 2: True, 3: False, 4: True, 5: True}


def test_a_second_loop_on_the_same_run_folder_is_refused(loop_cfg, tmp_path):
    out = tmp_path / "run"
    with locked(out):  # another process's loop (a lock is per open file: this process counts as another)
        with pytest.raises(UserError, match=rf"{re.escape(str(out))} is in use by process \d+ on .*: one run at a time"):
            run_loop(loop_cfg(out))
    assert not out.exists()  # it wrote nothing


def test_an_iteration_judged_by_a_reward_model_plus_the_answer_checker(loop_cfg, trained_rm, sandbox_data, tmp_path):
    """``annotator.combine``: 2 x BT + 0.5 x the built-in checker. Each component's scores equal the
    component computed directly on the iteration's rollouts, the reward is their weighted sum,
    and the pairs are chosen by that sum. ``eval.winrate``: the policy's held-out samples against
    the SFT policy's, each pair won when the judge scores it higher."""
    from rlhf_workflow.data.records import Rollout
    from rlhf_workflow.online.annotate import make_scorer
    from rlhf_workflow.reward.functions import exact_answer, record_of

    checker = "rlhf_workflow.reward.functions:exact_answer"
    cfg = loop_cfg(tmp_path, "iterations=1", "eval.kl=false", "annotate.annotator.path=unused",
                   f'annotate.annotator.combine=[{{kind: bt, path: "{trained_rm}", max_length: 256, weight: 2.0}}, '
                   f'{{kind: function, function: "{checker}", weight: 0.5}}]')
    run_loop(cfg)
    d = tmp_path / "iter_1"
    scored = read_records(d / "scored.jsonl", Rollout)
    model, tok = load_reward_model(trained_rm, "fp32")
    bt = score(model, tok, [ro.messages() for ro in scored for _ in ro.responses],
               [r for ro in scored for r in ro.responses], max_length=256, progress=False)
    assert [x for ro in scored for x in ro.reward_components["bt"]] == pytest.approx(bt, abs=1e-5)
    for ro in scored:
        checked = exact_answer(record_of(ro), ro.responses)
        assert ro.reward_components["exact_answer"] == checked
        assert ro.rewards == pytest.approx([2 * b + 0.5 * c for b, c in zip(ro.reward_components["bt"], checked,
                                                                        strict=True)])
    by_text = {(ro.id, r): x for ro in scored for r, x in zip(ro.responses, ro.rewards, strict=True)}
    pairs = _jsonl(d / "pairs.jsonl")
    assert pairs and all(by_text[(p["id"], p["chosen"])] > by_text[(p["id"], p["rejected"])] for p in pairs)
    judge = make_scorer(cfg.annotate.annotator)

    prompts = {p.id: p for p in read_records(sandbox_data / "prompts_eval.jsonl", Prompt)}

    def rewards(t):
        return judge([Rollout(prompt=prompts[row["id"]].prompt, meta=prompts[row["id"]].meta, **row)
                      for row in _jsonl(tmp_path / f"iter_{t}" / "eval_samples.jsonl")])

    wins = [0.5 + 0.5 * ((a > b) - (a < b)) for xa, xb in zip(rewards(1), rewards(0), strict=True)
            for a, b in zip(xa, xb, strict=True)]
    assert len(wins) == 12
    assert json.loads((d / "metrics.json").read_text())["win_rate"] == pytest.approx(sum(wins) / len(wins))
