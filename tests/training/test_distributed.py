"""Training on real ranks: ``torchrun`` starts 2 processes (gloo on CPU) and DDP, FSDP2 and
DeepSpeed ZeRO give the losses and weights one process gives; a sharded run killed with
SIGKILL resumes to the same result; the batch plan keeps every rank equally busy."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rlhf_workflow.config import TrainConfig, load_config
from rlhf_workflow.errors import UserError
from rlhf_workflow.reward.bt import RMConfig, run_rm_train
from rlhf_workflow.training.dpo import DPOConfig, run_dpo
from rlhf_workflow.training.loop import StepPlan, TrainData, batch_sizes
from rlhf_workflow.training.sft import SFTConfig, run_sft

WORLD = 2


def _needs(strategy: str):
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")


def torchrun_cmd(command: list[str], args: list[str], processes: int = WORLD) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "rlhf_workflow.cli", *command, *args]


def launch(command: list[str], args: list[str], processes: int = WORLD, kill_at: str | None = None):
    """``rlhf <command> args`` on ``processes`` processes, killed at a fault point if asked."""
    env = {**os.environ, "RLHF_KILL_AT": kill_at} if kill_at else None
    return subprocess.run(torchrun_cmd(command, args, processes), capture_output=True, text=True, timeout=900,
                          env=env)


def torchrun(command: list[str], args: list[str], processes: int = WORLD) -> str:
    """Run ``rlhf <command> args`` on WORLD processes; its output (fails the test on an error)."""
    done = launch(command, args, processes)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers live in their own groups)."""
    import psutil

    parent = psutil.Process(pid)
    for p in [parent, *parent.children(recursive=True)]:
        p.send_signal(signal.SIGKILL)


def _world(out) -> int:
    return json.loads((out / "train_plan.json").read_text())["processes"]


def _metrics(out, key="loss"):
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()
            if key in json.loads(line)]


def _weights(run) -> dict:
    """The exported model's weights, from one file or several."""
    return {k: v for f in sorted((run / "model").glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_same_weights(a, b, atol=2e-5):
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------- the plan


def test_every_item_is_trained_on_and_every_rank_runs_as_many_micro_batches():
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(301)]
    data = TrainData(lengths, collate=lambda rows: {}, pack_length=128)
    cfg = TrainConfig(epochs=3, global_batch_size=12, micro_batch_size=2, seed=3)
    micro, accum = batch_sizes(12, 2, 3)
    plan = StepPlan(data, cfg, micro, accum, world=3)
    sizes = [len(plan.plan(e)) for e in range(3)]
    assert len(set(sizes)) > 1 and any(n % 3 for n in sizes)  # epochs of different, uneven sizes
    seen = {e: [] for e in range(3)}
    fillers = 0
    for step in range(plan.total):
        per_rank = [plan.micro_batches(step, r) for r in range(3)]
        assert len({len(m) for _, m, _ in per_rank}) == 1  # every rank runs as many micro-batches
        epoch = int(per_rank[0][0] - 1e-9)
        for _, m, real in per_rank:
            seen[epoch] += [tuple(map(tuple, mb)) for mb in m[:real]]
            fillers += len(m) - real
            assert all(mb in m[:real] or any(mb in o[:r] for _, o, r in per_rank) for mb in m[real:])
    assert fillers > 0
    for e in range(3):  # each epoch: every micro-batch of its plan once, none dropped
        assert sorted(seen[e]) == sorted(tuple(map(tuple, mb)) for mb in plan.plan(e))


def test_micro_batches_by_tokens_hold_a_steps_pairs_balanced_over_the_ranks():
    """By tokens, a step's examples are the by-pairs plan's, shared out over the ranks within one
    example's length of each other, in micro-batches of at most the budget (one example alone
    when longer); every rank runs as many micro-batches."""
    rng = random.Random(1)
    lengths = [rng.randint(5, 300) for _ in range(203)]
    data = TrainData(lengths, collate=lambda rows: {}, by_tokens=True)
    cfg = TrainConfig(epochs=2, global_batch_size=24, micro_batch_size=4, seed=5)
    by_pairs = StepPlan(data, cfg, *batch_sizes(24, 4, 3), world=3)
    by_tokens = StepPlan(data, cfg.model_copy(update={"micro_batch_tokens": 256}), *batch_sizes(24, 24, 3), world=3)
    assert by_tokens.total == by_pairs.total == 2 * 9
    for step in range(by_tokens.total):
        shares = [by_tokens.micro_batches(step, r) for r in range(3)]
        assert len({len(m) for _, m, _ in shares}) == 1
        real = [[row for mb in m[:n] for row in mb] for _, m, n in shares]
        assert all(len(mb) == 1 for _, m, _ in shares for mb in m)  # one row a micro-batch
        assert all(sum(lengths[i] for i in row) <= 256 or len(row) == 1 for rows in real for row in rows)
        mine = sorted(i for rows in real for row in rows for i in row)
        theirs = sorted(i for _, m, n in (by_pairs.micro_batches(step, r) for r in range(3))
                        for mb in m[:n] for row in mb for i in row)
        assert mine == theirs and len(set(mine)) == len(mine)
        load = [sum(lengths[i] for row in rows for i in row) for rows in real]
        assert max(load) - min(load) <= max(lengths[i] for i in mine)
    with pytest.raises(UserError, match="micro_batch_tokens is for the pair stages"):
        StepPlan(TrainData(lengths, collate=lambda rows: {}), cfg.model_copy(update={"micro_batch_tokens": 256}),
                 *batch_sizes(24, 24, 3), world=3)


def test_micro_batches_are_dealt_up_and_down_the_ranks():
    """Rounds alternate direction, so rank 0 does not take the longest of every round."""
    from rlhf_workflow.training.loop import deal

    assert deal(5, 2) == [[0, 3, 4], [1, 2]]
    assert deal(7, 3) == [[0, 5, 6], [1, 4], [2, 3]]
    assert deal(1, 2) == [[0], []]


def test_global_batch_gives_the_accumulation():
    assert batch_sizes(128, 8, 8) == (8, 2)
    assert batch_sizes(128, 1, 8) == (1, 16)
    assert batch_sizes(16, 32, 2) == (8, 1)  # a micro-batch never exceeds a rank's share
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        batch_sizes(128, 8, 3)
    with pytest.raises(UserError, match="does not divide"):
        batch_sizes(120, 16, 1)


def test_adamw_on_bf16_weights_is_refused(tiny_model, sandbox_data, tmp_path):
    cfg = load_config(SFTConfig, None, [f"model.path={tiny_model}", "model.dtype=bf16",
                                        f"data.train={sandbox_data / 'sft.jsonl'}", "data.max_length=64",
                                        "train.max_steps=1", f"train.output_dir={tmp_path}",
                                        "train.progress=false"])
    with pytest.raises(UserError, match="refusing to train torch.bfloat16 parameters"):
        run_sft(cfg)
    cfg.train.allow_low_precision_weights = True
    assert (run_sft(cfg) / "model.safetensors").exists()


# --------------------------------------------------------------------------- 2 ranks == 1 rank


def _sft_args(tiny_model, data, out, *extra):
    return [f"model.path={tiny_model}", f"data.train={data}", "data.max_length=128", "optim.lr=1e-3",
            "optim.warmup_ratio=0.1", "train.epochs=3", "train.global_batch_size=4", "train.micro_batch_size=2",
            f"train.output_dir={out}", "train.progress=false", "train.log_every=1", *extra]


@pytest.fixture(scope="module")
def sft_one_rank(tiny_model, sandbox_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft1")
    run_sft(load_config(SFTConfig, None, _sft_args(tiny_model, sandbox_data / "sft.jsonl", out)))
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_packed_sft_on_two_ranks_equals_one(strategy, tiny_model, sandbox_data, sft_one_rank, tmp_path):
    """Whatever the number of packed rows (odd epochs included), 2 ranks train on every one."""
    _needs(strategy)
    out = tmp_path / strategy
    files = ["train.save_file_gib=0.0001"] if strategy in ("fsdp", "zero3") else []  # a streamed, many-file export
    torchrun(["sft"], _sft_args(tiny_model, sandbox_data / "sft.jsonl", out, f"train.strategy={strategy}", *files))
    if files:
        index = json.loads((out / "model" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2 and "lm_head.weight" in index["weight_map"]
        assert json.loads((out / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert _world(out) == WORLD and _world(sft_one_rank) == 1
    assert json.loads((out / "train_plan.json").read_text())["grad_accum"] == 1
    assert len(_metrics(out)) == len(_metrics(sft_one_rank)) > 15  # 3 packed epochs
    assert _metrics(out, "items") == _metrics(sft_one_rank, "items")  # 99 rows an epoch: none dropped
    assert _metrics(out) == pytest.approx(_metrics(sft_one_rank), rel=1e-5)
    _assert_same_weights(out, sft_one_rank)
    # the export of the sharded run is a plain transformers checkpoint
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    a = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    b = AutoModelForCausalLM.from_pretrained(sft_one_rank / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("setting", ["train.grad_sync=last", "train.reduce_dtype=bf16"])
def test_fsdp_gradient_sync_settings(setting, tiny_model, sandbox_data, sft_one_rank, tmp_path):
    """FSDP2 with 2 micro-batches a step on each rank: gradients accumulated unsharded and
    reduced once (the same training as 1 process), or reduced in bf16 (close to it)."""
    out = tmp_path / "two"
    torchrun(["sft"], _sft_args(tiny_model, sandbox_data / "sft.jsonl", out, "train.strategy=fsdp",
                                "train.micro_batch_size=1", setting))
    assert _world(out) == WORLD and json.loads((out / "train_plan.json").read_text())["grad_accum"] == 2
    exact = setting.endswith("last")
    assert _metrics(out) == pytest.approx(_metrics(sft_one_rank), rel=1e-5 if exact else 2e-2)
    _assert_same_weights(out, sft_one_rank, atol=2e-5 if exact else 2e-3)
    if not exact:  # (the bf16 reduction did happen: it rounded the gradients)
        wa, wb = _weights(out), _weights(sft_one_rank)
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) > 1e-5


def _rm_args(tiny_model, sandbox_data, out, *extra):
    return [f"model.path={tiny_model}", f"data.train={sandbox_data / 'prefs_train.jsonl'}",
            f"data.test={sandbox_data / 'prefs_test.jsonl'}", "data.max_length=128", "optim.lr=1e-3",
            "train.max_steps=6", "train.global_batch_size=8", "train.micro_batch_size=2",
            "train.eval_every=3", f"train.output_dir={out}", "train.progress=false", "train.log_every=1",
            *extra]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_reward_model_on_two_ranks_equals_one(strategy, tiny_model, sandbox_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / strategy
    run_rm_train(load_config(RMConfig, None, _rm_args(tiny_model, sandbox_data, one)))
    torchrun(["rm", "train"], _rm_args(tiny_model, sandbox_data, two, f"train.strategy={strategy}"))
    assert _world(two) == WORLD
    assert _metrics(two) == pytest.approx(_metrics(one), rel=1e-5)
    assert _metrics(two, "eval/accuracy") == pytest.approx(_metrics(one, "eval/accuracy"), abs=1e-9)
    assert len(_metrics(two, "eval/loss")) == 2  # held-out evaluation at step 3 and 6
    _assert_same_weights(two, one)
    e1, e2 = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    assert e2["accuracy"] == e1["accuracy"] and e2["loss"] == pytest.approx(e1["loss"], rel=1e-5)


def _dpo_args(tiny_model, sandbox_data, out, *extra):
    return [f"model.path={tiny_model}", f"data.train={sandbox_data / 'prefs_train.jsonl'}",
            "data.max_length=96", "optim.lr=1e-3", "optim.warmup_ratio=0", "train.max_steps=4",
            "train.global_batch_size=8", "train.micro_batch_size=4", f"train.output_dir={out}",
            "train.progress=false", "train.log_every=1", *extra]


@pytest.mark.parametrize("strategy, by_tokens", [("ddp", True), ("fsdp", False), ("zero3", False), ("zero3", True)])
def test_dpo_and_its_reference_pass_on_two_ranks_equal_one(strategy, by_tokens, tiny_model, sandbox_data, tmp_path):
    """(By tokens: 2 ranks with several pairs packed into a row against 1 process by pairs.)"""
    _needs(strategy)
    one, two = tmp_path / "one", tmp_path / strategy
    run_dpo(load_config(DPOConfig, None, _dpo_args(tiny_model, sandbox_data, one)))
    tokens = ["train.micro_batch_tokens=400"] if by_tokens else []
    log = torchrun(["dpo"], _dpo_args(tiny_model, sandbox_data, two, f"train.strategy={strategy}", *tokens))
    assert f"computing log-probs of 400 pairs once, on {WORLD} process(es)" in log
    assert _world(two) == WORLD
    (c1,), (c2,) = (list(d.glob("ref_logps-*.safetensors")) for d in (one, two))
    torch.testing.assert_close(load_file(c2)["logps"], load_file(c1)["logps"], atol=1e-5, rtol=1e-6)
    assert _metrics(two)[0] == pytest.approx(0.6931472, abs=1e-5)
    assert _metrics(two) == pytest.approx(_metrics(one), rel=1e-5)
    _assert_same_weights(two, one)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_a_separate_reference_is_sharded_like_the_policy(strategy, tiny_model, sandbox_data, tmp_path):
    """Under FSDP2 and ZeRO-3 a reference that is not the starting policy is sharded over the
    ranks (FSDP2, no optimizer) for its pass; its log-probs and the training are 1 rank's."""
    _needs(strategy)
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(tiny_model, ref)
    one, two = tmp_path / "one", tmp_path / "two"
    run_dpo(load_config(DPOConfig, None, _dpo_args(tiny_model, sandbox_data, one, f"reference.path={ref}")))
    log = torchrun(["dpo"], _dpo_args(tiny_model, sandbox_data, two, f"reference.path={ref}",
                                      f"train.strategy={strategy}"))
    assert f"on {WORLD} process(es), sharded (FSDP2)" in log
    (c1,), (c2,) = (list(d.glob("ref_logps-*.safetensors")) for d in (one, two))
    torch.testing.assert_close(load_file(c2)["logps"], load_file(c1)["logps"], atol=1e-5, rtol=1e-6)
    assert _metrics(two) == pytest.approx(_metrics(one), rel=1e-5)
    _assert_same_weights(two, one)


def test_bf16_dpo_under_fsdp_starts_at_exactly_log2(tiny_model, sandbox_data, tmp_path):
    """FSDP2 with bf16 compute: the reference pass (the starting policy's weights in bf16, sharded
    like the policy) runs each rank's own first-epoch micro-batches, so the first margins are 0."""
    out = tmp_path / "bf16"
    torchrun(["dpo"], _dpo_args(tiny_model, sandbox_data, out, "train.strategy=fsdp", "train.mixed_precision=bf16",
                                "train.max_steps=1", "train.micro_batch_size=3", "train.global_batch_size=6"))
    assert _world(out) == WORLD
    assert _metrics(out)[0] == pytest.approx(0.6931472, abs=1e-6) and _metrics(out, "rewards/margin")[0] == 0.0


def test_dpo_on_two_nodes_equals_one_process(tiny_model, sandbox_data, tmp_path):
    """Two nodes without a cluster: two torchrun agents on 127.0.0.1 (node ranks 0 and 1, one
    process each, a static rendezvous as on two hosts) run DPO under FSDP2, each rank loading
    its share; the reference pass, the losses and the weights are one process's."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    one, two = tmp_path / "one", tmp_path / "two"
    run_dpo(load_config(DPOConfig, None, _dpo_args(tiny_model, sandbox_data, one)))
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r), "--nproc_per_node",
         "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "rlhf_workflow.cli", "dpo",
         *_dpo_args(tiny_model, sandbox_data, two, "train.strategy=fsdp")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    logs = [a.communicate(timeout=600) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], logs[0][1][-2000:] + logs[1][1][-2000:]
    assert _world(two) == 2 and "on 2 process(es)" in logs[0][0]
    (c1,), (c2,) = (list(d.glob("ref_logps-*.safetensors")) for d in (one, two))
    torch.testing.assert_close(load_file(c2)["logps"], load_file(c1)["logps"], atol=1e-5, rtol=1e-6)
    assert _metrics(two) == pytest.approx(_metrics(one), rel=1e-5)
    _assert_same_weights(two, one)


def test_dpo_on_two_ranks_trains_every_pair_of_an_odd_count(tiny_model, sandbox_data, tmp_path):
    """9 pairs in micro-batches of 2: the last step has one micro-batch, which rank 0 trains on
    while rank 1 runs a zero-weight filler; the update is one process's."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join((sandbox_data / "prefs_train.jsonl").read_text().splitlines(True)[:9]))
    args = [f"model.path={tiny_model}", f"data.train={pairs}", "data.max_length=96", "optim.lr=1e-3",
            "optim.warmup_ratio=0", "train.epochs=1", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.progress=false", "train.log_every=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_dpo(load_config(DPOConfig, None, [*args, f"train.output_dir={one}"]))
    torchrun(["dpo"], [*args, f"train.output_dir={two}"])
    assert _world(two) == WORLD
    assert _metrics(two, "items") == _metrics(one, "items") == [4, 4, 1]
    assert _metrics(two) == pytest.approx(_metrics(one), rel=1e-5)
    _assert_same_weights(two, one)


def test_a_nonfinite_step_under_zero_says_the_update_was_applied(tiny_model, sandbox_data, tmp_path):
    """DeepSpeed steps inside its engine, so a non-finite step is applied: the run stops with one
    line that says so (not that the weights were kept)."""
    _needs("zero2")
    done = launch(["sft"], _sft_args(tiny_model, sandbox_data / "sft.jsonl", tmp_path / "run", "train.strategy=zero2",
                                     "optim.lr=1e30", "train.max_steps=4", "optim.max_grad_norm=0"))
    assert done.returncode != 0 and _world(tmp_path / "run") == WORLD
    assert "DeepSpeed applied the update (it steps inside its engine)" in done.stderr, done.stderr[-2000:]
    assert "the weights were not updated" not in done.stderr


# --------------------------------------------------------------------------- crash and resume


@pytest.mark.parametrize("strategy", ["zero3"])
def test_a_zero_run_killed_while_checkpointing_resumes_to_the_same_result(strategy, tiny_model, sandbox_data,
                                                                          tmp_path):
    """Both ranks die while writing their second checkpoint (DeepSpeed's own format); a re-run
    on one process is refused in one line (DeepSpeed resumes only on as many processes); the
    re-run on two removes the unfinished one, resumes from the first and ends where one process ends."""
    _needs(strategy)
    args = [f"model.path={tiny_model}", f"data.train={sandbox_data / 'sft.jsonl'}", "data.max_length=128",
            "data.packing=false", "optim.lr=1e-3", "train.max_steps=8", "train.save_every=3",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.progress=false", "train.log_every=1"]
    one, out = tmp_path / "one", tmp_path / "killed"
    run_sft(load_config(SFTConfig, None, [*args, f"train.output_dir={one}"]))
    args += [f"train.output_dir={out}", f"train.strategy={strategy}"]
    killed = launch(["sft"], args, kill_at="checkpoint:2")
    assert killed.returncode != 0 and (out / "checkpoints" / "step-000006.tmp").exists()
    refused = launch(["sft"], args, processes=1)
    assert refused.returncode != 0 and "rlhf_workflow/" not in refused.stderr  # no frame of ours (torchrun's own
    # report of a failed worker is a traceback of the agent)
    assert "error: " + str(out / "checkpoints" / "step-000003") + " was saved by DeepSpeed on 2 processes; " \
        "DeepSpeed resumes a run only on as many (this is 1)" in refused.stderr, refused.stderr[-2000:]
    log = torchrun(["sft"], args)
    assert "resuming at step 3" in log and _world(out) == WORLD
    assert _metrics(out, "step") == list(range(1, 9))
    assert _metrics(out) == pytest.approx(_metrics(one), rel=1e-5)
    _assert_same_weights(out, one)
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_sharded_run_killed_with_sigkill_resumes_to_the_same_result(tiny_model, sandbox_data, tmp_path):
    args = [f"model.path={tiny_model}", f"data.train={sandbox_data / 'sft.jsonl'}", "data.max_length=128",
            "data.packing=false", "optim.lr=1e-3", "train.max_steps=40", "train.save_every=3",
            "train.global_batch_size=4", "train.micro_batch_size=2", "train.progress=false",
            "train.log_every=1", "train.strategy=fsdp"]
    one = tmp_path / "one"
    run_sft(load_config(SFTConfig, None, [*args[:-1], f"train.output_dir={one}"]))
    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_cmd(["sft"], [*args, f"train.output_dir={out}"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "step-000003" / "state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.wait()
    assert not (out / "train_result.json").exists()
    log = torchrun(["sft"], [*args, f"train.output_dir={out}"])
    assert "resuming at step " in log, log
    resumed = int(log.split("resuming at step ")[1].split()[0])
    assert 3 <= resumed < 40 and _world(out) == WORLD
    steps = _metrics(out, "step")
    assert steps == list(range(1, 41))  # no line lost or repeated
    assert _metrics(out) == pytest.approx(_metrics(one), rel=1e-5)
    _assert_same_weights(out, one)
    assert not list((out / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("saved_on", [WORLD, 1])
def test_an_fsdp_checkpoint_resumes_on_another_number_of_processes(saved_on, tiny_model, sandbox_data,
                                                                  sft_one_rank, tmp_path):
    """torch.distributed.checkpoint reshards on load: a run killed while writing its second
    checkpoint on 2 processes resumes from the first on 1, one killed on 1 resumes on 2, and
    both end where the uninterrupted run ends, no metric line lost or repeated."""
    out = tmp_path / "run"
    args = _sft_args(tiny_model, sandbox_data / "sft.jsonl", out, "train.save_every=4", "train.strategy=fsdp")
    killed = launch(["sft"], args, processes=saved_on, kill_at="checkpoint:2")
    assert killed.returncode != 0 and (out / "checkpoints" / "step-000008.tmp").exists()
    assert json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())["processes"] == saved_on
    log = torchrun(["sft"], args, processes=WORLD + 1 - saved_on)
    assert "resuming at step 4" in log and _world(out) == WORLD + 1 - saved_on
    assert _metrics(out, "step") == _metrics(sft_one_rank, "step")
    assert _metrics(out) == pytest.approx(_metrics(sft_one_rank), rel=1e-5)
    _assert_same_weights(out, sft_one_rank)
