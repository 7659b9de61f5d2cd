import json
import re
import subprocess
import sys

import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.config import load_config
from rlhf_workflow.data.readers import read_records
from rlhf_workflow.data.records import Prompt, Rollout
from rlhf_workflow.errors import UserError
from rlhf_workflow.generation.sampling import Sample
from rlhf_workflow.online.chunks import locked
from rlhf_workflow.online.generate import GenerateConfig, make_generator, run_generate


def _args(tiny_model, sandbox_data, out, *extra):
    return [f"model.path={tiny_model}", f"input={sandbox_data / 'prompts_eval.jsonl'}", f"out={out}",
            "sampling.n=3", "sampling.max_new_tokens=8", "chunk_size=7", "limit=20", *extra]


def _crashing_at(call: int, real, calls: list):
    """The generator ``real``, raising KeyboardInterrupt (a crash mid-stage) on its ``call``-th call."""
    def generate(prompts, sampling):
        calls.append(len(prompts))
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(prompts, sampling)
    return generate


def test_generate_cli_writes_every_prompt_once(tiny_model, sandbox_data, tmp_path):
    out = tmp_path / "rollouts.jsonl"
    assert main(["generate", *_args(tiny_model, sandbox_data, out)]) == 0
    rollouts = read_records(out, Rollout)
    prompts = read_records(sandbox_data / "prompts_eval.jsonl", Prompt)[:20]
    assert [r.id for r in rollouts] == [p.id for p in prompts]  # every prompt once, in order
    for r in rollouts:
        assert len(r.responses) == 3 and len(r.finish_reasons) == 3 and r.meta["skill"]
        assert all(0 < n <= 8 for n in r.num_tokens)
    assert not (tmp_path / "rollouts.jsonl.parts").exists()


def test_crash_mid_stage_loses_at_most_one_chunk(tiny_model, sandbox_data, tmp_path):
    cfg = load_config(GenerateConfig, None, _args(tiny_model, sandbox_data, tmp_path / "full.jsonl"))
    run_generate(cfg)
    crashing = load_config(GenerateConfig, None, _args(tiny_model, sandbox_data, tmp_path / "r.jsonl"))
    real, calls = make_generator(crashing), []
    flaky = _crashing_at(3, real, calls)
    with pytest.raises(KeyboardInterrupt):
        run_generate(crashing, generator=flaky)
    assert sorted(p.name for p in (tmp_path / "r.jsonl.parts").iterdir()) == [
        "chunk-000000.jsonl", "chunk-000001.jsonl", "left_out.json", "settings.json"]
    calls.clear()
    run_generate(crashing, generator=flaky)
    assert calls == [6]  # only the third chunk (prompts 14..19) was generated again
    assert (tmp_path / "r.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()


def test_parts_of_other_settings_are_never_reused_and_leftovers_are_removed(tiny_model, sandbox_data, tmp_path):
    out = tmp_path / "r.jsonl"
    cfg = load_config(GenerateConfig, None, _args(tiny_model, sandbox_data, out))
    real, calls = make_generator(cfg), []
    with pytest.raises(KeyboardInterrupt):
        run_generate(cfg, generator=_crashing_at(2, real, calls))
    assert (tmp_path / "r.jsonl.parts" / "chunk-000000.jsonl").exists()
    other = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"temperature": 0.5})})
    calls.clear()
    run_generate(other, generator=lambda p, s: calls.append(len(p)) or real(p, s))
    assert calls == [7, 7, 6]  # the chunk sampled at temperature 1.0 was not reused
    # killed while the parts folder was being removed after the join: the leftover goes
    (tmp_path / "r.jsonl.parts").mkdir()
    (tmp_path / "r.jsonl.parts" / "chunk-000000.jsonl").write_text("stale\n")
    run_generate(other)
    assert not (tmp_path / "r.jsonl.parts").exists()


def test_two_processes_give_the_same_rollouts(tiny_model, sandbox_data, tmp_path):
    """20 prompts in chunks of 7 on 2 ranks (not a multiple of 2 x 7): the same bytes as 1 rank."""
    single = tmp_path / "one.jsonl"
    assert main(["generate", *_args(tiny_model, sandbox_data, single)]) == 0
    double = tmp_path / "two.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rlhf_workflow.cli", "generate", *_args(tiny_model, sandbox_data, double)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "3 chunk(s) on 2 process(es)" in res.stdout
    assert double.read_bytes() == single.read_bytes()


def test_progress_bar_knows_the_prompt_count(tiny_model, sandbox_data, tmp_path, capsys):
    args = [f"model.path={tiny_model}", f"input={sandbox_data / 'prompts_eval.jsonl'}", "sampling.n=1",
            "sampling.max_new_tokens=2", "chunk_size=16"]
    assert main(["generate", *args, f"out={tmp_path / 'a.jsonl'}", "limit=20"]) == 0
    assert "20/20" in capsys.readouterr().err
    assert main(["generate", *args, f"out={tmp_path / 'b.jsonl'}"]) == 0  # all 40: counted from the file
    assert "40/40" in capsys.readouterr().err


# --------------------------------------------------------------------------- vLLM engines, without vLLM
# The engine is faked; everything around it (placement, worker commands and environments, shards,
# nodes, the join) is the real code. Response j of chunk i reads "seed i response j": the chunk was
# sampled with seed sampling.seed + i, wherever it ran.

def _fake_engine(prompts, sampling):
    return [[Sample(f"seed {sampling.seed} response {j}", "stop", 3) for j in range(sampling.n)] for _ in prompts]


def _assert_every_prompt_once(out, sandbox_data, n=20, chunk_size=7):
    rollouts = read_records(out, Rollout)
    assert [r.id for r in rollouts] == [p.id for p in read_records(sandbox_data / "prompts_eval.jsonl", Prompt)[:n]]
    assert [r.responses for r in rollouts] == [[f"seed {k // chunk_size} response {j}" for j in range(3)]
                                               for k in range(n)]


def _workers_here(monkeypatch, fail=()):
    """subprocess.Popen for engine workers: records each one's command and environment, then
    runs it in this process with the fake engine (or fails it, for the shards in ``fail``)."""
    started, real_popen = [], subprocess.Popen

    class Worker:
        def __new__(cls, cmd, **kwargs):
            return super().__new__(cls) if "rlhf_workflow.cli" in cmd else real_popen(cmd, **kwargs)  # e.g. git

        def __init__(self, cmd, env):
            started.append({"cmd": cmd, "env": env})
            self.code = 1 if cmd[-1] in fail else 0
            if not self.code:
                run_generate(load_config(GenerateConfig, cmd[cmd.index("--config") + 1], [cmd[-1]]),
                             generator=_fake_engine)

        def wait(self):
            return self.code

    monkeypatch.setattr(subprocess, "Popen", Worker)
    return started


def test_vllm_engines_run_on_the_jobs_gpus_in_groups_of_the_tp_size(tiny_model, sandbox_data, tmp_path,
                                                                     monkeypatch, capsys):
    """CUDA_VISIBLE_DEVICES=4,5,6,7 and TP 2: two workers, on 4,5 and on 6,7, on shards 0/2 and 1/2,
    not inheriting the launcher's world; the same rollouts as one engine in this process."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: one engine, in this process
    one = tmp_path / "one.jsonl"
    run_generate(load_config(GenerateConfig, None, _args(tiny_model, sandbox_data, one, "backend=vllm")),
                 generator=_fake_engine)
    assert "3 chunk(s) on 1 process(es)" in capsys.readouterr().out
    _assert_every_prompt_once(one, sandbox_data)

    for key, value in (("CUDA_VISIBLE_DEVICES", "4,5,6,7"), ("WORLD_SIZE", "1"), ("RANK", "0"),
                       ("MASTER_PORT", "29500"), ("TORCHELASTIC_RUN_ID", "job")):
        monkeypatch.setenv(key, value)
    started = _workers_here(monkeypatch)
    two = tmp_path / "two.jsonl"
    run_generate(load_config(GenerateConfig, None, _args(tiny_model, sandbox_data, two, "backend=vllm",
                                                         "vllm.tensor_parallel_size=2", "vllm.engines=0")))
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in started] == ["4,5", "6,7"]
    assert [w["cmd"][-1] for w in started] == ["shard=0/2", "shard=1/2"]
    assert all(w["cmd"][1:5] == ["-m", "rlhf_workflow.cli", "generate", "--config"] for w in started)
    for w in started:
        assert not {"WORLD_SIZE", "RANK", "MASTER_PORT", "TORCHELASTIC_RUN_ID"} & set(w["env"])
    assert "3 chunk(s) on 2 vLLM engine(s) on 1 node(s)" in capsys.readouterr().out
    assert two.read_bytes() == one.read_bytes()


def test_a_failed_engine_worker_fails_the_stage_and_a_rerun_redoes_only_its_chunks(tiny_model, sandbox_data,
                                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg = load_config(GenerateConfig, None, _args(tiny_model, sandbox_data, tmp_path / "r.jsonl", "backend=vllm",
                                                  "vllm.engines=0"))
    _workers_here(monkeypatch, fail={"shard=1/2"})
    with pytest.raises(RuntimeError, match=r"engine worker\(s\) \[1\] of 2 failed"):
        run_generate(cfg)
    assert sorted(p.name for p in (tmp_path / "r.jsonl.parts").glob("chunk-*")) == [
        "chunk-000000.jsonl", "chunk-000002.jsonl"]  # engine 0's chunks
    _workers_here(monkeypatch)
    run_generate(cfg)
    _assert_every_prompt_once(tmp_path / "r.jsonl", sandbox_data)


def test_vllm_placement_problems_are_one_line_errors(tiny_model, sandbox_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    args = _args(tiny_model, sandbox_data, tmp_path / "r.jsonl", "backend=vllm")
    assert main(["generate", *args, "vllm.tensor_parallel_size=3"]) == 2
    assert "the 4 visible GPU(s) (0,1,2,3) do not split into engines of vllm.tensor_parallel_size=3" in (
        capsys.readouterr().err)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node 2: two processes on a node
    assert main(["generate", *args]) == 2
    assert "one process per node" in capsys.readouterr().err


NODE = """
import json, os, subprocess, sys

import torch.distributed as dist

from rlhf_workflow import cli

log, worker = sys.argv[1], sys.argv[2]
real_popen = subprocess.Popen


def start(cmd, **kwargs):  # an engine worker, started for real, with a fake engine instead of vLLM
    if "rlhf_workflow.cli" not in cmd:
        return real_popen(cmd, **kwargs)  # e.g. git, for the manifest
    env = kwargs["env"]
    with open(os.path.join(log, "node-" + str(dist.get_rank()) + ".jsonl"), "a") as f:
        f.write(json.dumps({"shard": cmd[-1], "devices": env["CUDA_VISIBLE_DEVICES"]}) + "\\n")
    return real_popen([sys.executable, worker, *cmd[cmd.index("--config"):]], env=env)


def leave(real=cli._leave_process_group):  # the stage succeeded: the group it ran in, then leave it
    print("world", dist.get_world_size(), "rank", dist.get_rank(), "backend", dist.get_backend())
    real()


subprocess.Popen = start
cli._leave_process_group = leave
print("launched with WORLD_SIZE", os.environ["WORLD_SIZE"], "RANK", os.environ["RANK"], flush=True)
sys.exit(cli.main(["generate", *sys.argv[3:]]))
"""

WORKER = """
import json, os, sys

from rlhf_workflow.config import load_config
from rlhf_workflow.generation.sampling import Sample
from rlhf_workflow.online.generate import GenerateConfig, run_generate

seeds = []


def engine(prompts, sampling):
    seeds.append(sampling.seed)
    return [[Sample(f"seed {sampling.seed} response {j}", "stop", 3) for j in range(sampling.n)] for _ in prompts]


cfg = load_config(GenerateConfig, sys.argv[2], sys.argv[3:])
run_generate(cfg, generator=engine)
seen = {"devices": os.environ["CUDA_VISIBLE_DEVICES"], "chunks": seeds,
        "launcher_env": sorted(k for k in ("RANK", "WORLD_SIZE", "MASTER_PORT") if k in os.environ)}
with open(os.path.join(os.path.dirname(sys.argv[2]), "worker-" + cfg.shard.replace("/", "-") + ".json"), "w") as f:
    json.dump(seen, f)
"""


def _two_nodes(tmp_path, devices: tuple[str, str], args: list[str]) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents on 127.0.0.1, node 0 and node 1, one process each (as on two hosts),
    with ``devices`` as each node's CUDA_VISIBLE_DEVICES."""
    import os
    import socket

    (tmp_path / "node.py").write_text(NODE)
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = [(tmp_path / f"agent-{node}.out", tmp_path / f"agent-{node}.err") for node in (0, 1)]
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(tmp_path / "node.py"), str(tmp_path), str(tmp_path / "worker.py"), *args],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": devices[node]}, stdout=logs[node][0].open("w"),
        stderr=logs[node][1].open("w")) for node in (0, 1)]
    try:
        codes = [a.wait(timeout=60) for a in agents]
    finally:
        for a in agents:
            a.kill()
    return [subprocess.CompletedProcess(a.args, code, out.read_text(), err.read_text())
            for a, code, (out, err) in zip(agents, codes, logs, strict=True)]


def test_vllm_engines_on_two_nodes_share_the_chunks(tiny_model, sandbox_data, tmp_path):
    """Two nodes (torchrun agents, one process per node) of 4 GPUs each, TP 2: each node starts
    two engine workers on its own devices (indices on one node, UUIDs on the other); the 4
    engines take global shards 0..3, chunk i on engine i % 4; node 0 joins every prompt once."""
    import json

    uuids = ["GPU-8f3c0a", "GPU-8f3c0b", "GPU-8f3c0c", "GPU-8f3c0d"]
    out = tmp_path / "rollouts.jsonl"
    res = _two_nodes(tmp_path, ("0,1,2,3", ",".join(uuids)), _args(
        tiny_model, sandbox_data, out, "backend=vllm", "vllm.tensor_parallel_size=2", "vllm.engines=0",
        "chunk_size=2"))
    assert [r.returncode for r in res] == [0, 0], res[0].stderr[-3000:] + res[1].stderr[-3000:]
    assert [f"launched with WORLD_SIZE 2 RANK {node}" in r.stdout for node, r in enumerate(res)] == [True, True]
    assert "world 2 rank 0 backend gloo" in res[0].stdout and "world 2 rank 1 backend gloo" in res[1].stdout
    assert "10 chunk(s) on 4 vLLM engine(s) on 2 node(s)" in res[0].stdout
    started = {node: [json.loads(line) for line in (tmp_path / f"node-{node}.jsonl").read_text().splitlines()]
               for node in (0, 1)}
    assert started == {0: [{"shard": "shard=0/4", "devices": "0,1"}, {"shard": "shard=1/4", "devices": "2,3"}],
                       1: [{"shard": "shard=2/4", "devices": ",".join(uuids[:2])},
                           {"shard": "shard=3/4", "devices": ",".join(uuids[2:])}]}
    workers = {g: json.loads((tmp_path / f"worker-{g}-4.json").read_text()) for g in range(4)}
    assert {g: w["chunks"] for g, w in workers.items()} == {0: [0, 4, 8], 1: [1, 5, 9], 2: [2, 6], 3: [3, 7]}
    assert all(w["launcher_env"] == [] for w in workers.values())  # each worker is a process of its own
    _assert_every_prompt_once(out, sandbox_data, chunk_size=2)


@pytest.mark.parametrize(("node_1", "says"), [
    ("0,1", "error: backend=vllm: every node must run the same number of engines, nodes 0..1 have [2, 1]"),
    ("0,1,2", "error: node 1: backend=vllm: the 3 visible GPU(s) (0,1,2) do not split into engines of "
              "vllm.tensor_parallel_size=2"),
], ids=["engine counts differ", "gpus do not split"])
def test_a_placement_problem_on_one_node_stops_every_node_with_one_line(node_1, says, tiny_model, sandbox_data,
                                                                        tmp_path):
    res = _two_nodes(tmp_path, ("0,1,2,3", node_1), _args(
        tiny_model, sandbox_data, tmp_path / "r.jsonl", "backend=vllm", "vllm.tensor_parallel_size=2",
        "vllm.engines=0"))
    assert all(r.returncode != 0 and says in r.stderr for r in res), res[0].stderr[-3000:]
    assert [f"launched with WORLD_SIZE 2 RANK {node}" in r.stdout for node, r in enumerate(res)] == [True, True]
    assert not (tmp_path / "node-0.jsonl").exists() and not (tmp_path / "node-1.jsonl").exists()  # none started


def test_the_loop_launches_vllm_generation_once_per_node(tmp_path, monkeypatch):
    """With a launcher, the loop starts vLLM generation through it with {processes} = 1 (one
    process per node, which starts that node's engines); without one, in its own process."""
    from types import SimpleNamespace

    from rlhf_workflow.online import loop

    launched, here = [], []
    monkeypatch.setattr(subprocess, "run", lambda cmd: launched.append(cmd) or SimpleNamespace(returncode=0))
    monkeypatch.setitem(loop.RUNNERS, "generate", here.append)
    gen = GenerateConfig(backend="vllm")
    cfg = SimpleNamespace(processes=8, launcher=["srun", "--nodes=2", "torchrun", "--nproc_per_node={processes}"])
    loop._launch(cfg, "generate", gen, tmp_path / "generate.yaml", 1, per_node=True)
    assert launched == [["srun", "--nodes=2", "torchrun", "--nproc_per_node=1", "-m", "rlhf_workflow.cli",
                         "generate", "--config", str(tmp_path / "generate.yaml")]]
    assert load_config(GenerateConfig, tmp_path / "generate.yaml", []) == gen and here == []
    loop._launch(SimpleNamespace(processes=8, launcher=[]), "generate", gen, tmp_path / "g.yaml", 1)
    assert here == [gen] and len(launched) == 1


def test_a_setting_that_changes_no_rollout_keeps_finished_chunks_and_others_are_refused(tiny_model, sandbox_data,
                                                                                        tmp_path):
    out = tmp_path / "r.jsonl"
    cfg = load_config(GenerateConfig, None, _args(tiny_model, sandbox_data, out))
    real, calls = make_generator(cfg), []
    with pytest.raises(KeyboardInterrupt):
        run_generate(cfg, generator=_crashing_at(2, real, calls))
    calls.clear()
    run_generate(cfg.model_copy(update={"on_bad": "skip"}), generator=lambda p, s: calls.append(len(p)) or real(p, s))
    assert calls == [7, 6]  # the finished chunk was kept
    assert main(["generate", *_args(tiny_model, sandbox_data, out)]) == 0  # the same settings: done already
    with pytest.raises(UserError, match=r"r.jsonl exists, made with other settings \(sampling.n: 3 -> 2\); remove it"):
        run_generate(cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"n": 2})}))
    with pytest.raises(UserError, match=r"out=.* is a folder: give the path of the file to write"):
        run_generate(cfg.model_copy(update={"out": str(tmp_path)}))


def test_every_prompt_is_checked_before_any_is_sampled(tiny_model, sandbox_data, tmp_path):
    prompts = sandbox_data / "prompts_eval.jsonl"
    lines = prompts.read_text().splitlines()[:20]
    long = json.dumps({"prompt": "seven " * 20_000, "id": "huge"})  # 120K characters: never tokenized
    blank = json.dumps({"prompt": "  ", "id": "blank"})
    data = tmp_path / "prompts.jsonl"
    calls = []
    spy = lambda p, s: calls.append(len(p)) or [[Sample("x", "stop", 1)] * s.n for _ in p]  # noqa: E731
    for bad, message in ((long, r"line 21 \(id 'huge'\): the prompt has 120000 characters, more tokens than the "
                          r"model's 512 positions"), (blank, r"line 21: field 'prompt': must not be empty")):
        data.write_text("\n".join([*lines, bad, lines[0]]) + "\n")
        cfg = load_config(GenerateConfig, None, [f"model.path={tiny_model}", f"input={data}",
                                                 f"out={tmp_path / 'r.jsonl'}", "chunk_size=4", "sampling.max_new_tokens=8"])
        with pytest.raises(UserError, match=message):
            run_generate(cfg, generator=spy)
        assert calls == []  # nothing was sampled
    data.write_text("\n".join([*lines, long, blank, lines[0]]) + "\n")
    run_generate(cfg.model_copy(update={"on_bad": "skip"}), generator=spy)
    assert len(read_records(tmp_path / "r.jsonl", Rollout)) == 21 and sum(calls) == 21


def test_a_second_run_on_the_same_output_is_refused(tiny_model, sandbox_data, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    with locked(out):  # another process's run (a lock is per open file, so this process counts as another)
        assert main(["generate", *_args(tiny_model, sandbox_data, out)]) == 2
    assert re.search(rf"error: {re.escape(str(out))} is in use by process \d+ on .*: one run at a time",
                     capsys.readouterr().err)
    assert not (tmp_path / "r.jsonl.parts").exists()
    assert main(["generate", *_args(tiny_model, sandbox_data, out)]) == 0  # the lock went with its holder


def test_a_disk_that_fills_mid_chunk_is_one_line_and_the_rerun_continues(tiny_model, sandbox_data, tmp_path,
                                                                         monkeypatch):
    import errno
    import os

    cfg = load_config(GenerateConfig, None, _args(tiny_model, sandbox_data, tmp_path / "r.jsonl"))
    real = os.fsync

    def fills_up(fd):  # the disk is full when the second chunk is written
        if len(list((tmp_path / "r.jsonl.parts").glob("chunk-*"))) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fills_up)
    with pytest.raises(UserError, match=r"cannot write .*chunk-000001.jsonl: No space left on device"):
        run_generate(cfg)
    monkeypatch.setattr(os, "fsync", real)
    parts = sorted(p.name for p in (tmp_path / "r.jsonl.parts").iterdir())
    assert parts == ["chunk-000000.jsonl", "left_out.json", "settings.json"]  # no half-written chunk
    run_generate(cfg)
    full = tmp_path / "full.jsonl"
    run_generate(cfg.model_copy(update={"out": str(full)}))
    assert (tmp_path / "r.jsonl").read_text() == full.read_text()
