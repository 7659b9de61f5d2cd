"""`rlhf loop` killed with SIGKILL (a real kill -9 of the real process) at 12 points of a
2-iteration run, re-running the same command after each kill: the run ends with the bytes,
metrics and weights of an uninterrupted run, no record lost or duplicated, no completed stage
run twice, and no temporary file left behind. The points are named in ``rlhf_workflow.faults``."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from rlhf_workflow.config import save_config
from rlhf_workflow.online.loop import run_loop

FILES = ["prompts.jsonl", "rollouts.jsonl", "scored.jsonl", "pairs.jsonl", "metrics.json"]


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().split("\n") if x]  # JSON Lines: split on \n only

# (point, pass) in the order a run reaches them; each re-run continues and dies at the next
KILLS = ["generate.chunk:2",  # iteration 1: the second chunk sampled, not yet written
         "join:1",  # mid-join of the generated chunks
         "annotate.chunk:1",  # a chunk scored, not yet written
         "pairs",  # pairs selected, not yet written
         "reference",  # DPO's reference log-probs computed, not yet cached
         "checkpoint",  # a DPO checkpoint's shards written, not yet marked complete
         "export",  # the DPO model folder written, not yet renamed into place
         "eval",  # iteration 1 evaluated, metrics not yet written
         "generate.chunk:1",  # iteration 2's first chunk
         "reference",  # iteration 2's DPO
         "summary",  # summary.json written, summary.md not
         "report"]  # the summary written, the report not


def test_killed_at_twelve_points_the_rerun_gives_the_uninterrupted_run(loop_cfg, tmp_path):
    full = tmp_path / "full"
    run_loop(loop_cfg(full))
    out = tmp_path / "killed"
    config = tmp_path / "loop.yaml"
    save_config(loop_cfg(out), config)
    cmd = [sys.executable, "-m", "rlhf_workflow.cli", "loop", "--config", str(config)]
    completed: dict = {}
    for kill in KILLS:
        res = subprocess.run(cmd, env={**os.environ, "RLHF_KILL_AT": kill}, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == -9, f"{kill}: not killed ({res.returncode}): {res.stderr[-2000:]}"
        state = json.loads((out / "state.json").read_text())["completed"] if (out / "state.json").exists() else {}
        assert {k: state[k] for k in completed} == completed, f"{kill}: a completed stage ran again"
        completed = state
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]

    for t in (1, 2):
        for f in FILES:
            a, b = full / f"iter_{t}" / f, out / f"iter_{t}" / f
            if f == "metrics.json":
                ma, mb = json.loads(a.read_text()), json.loads(b.read_text())
                ma.pop("policy"), mb.pop("policy")
                assert ma == mb, f"iter_{t}/{f}"
            else:
                assert a.read_bytes() == b.read_bytes(), f"iter_{t}/{f}"
        ma, mb = (_jsonl(d / f"iter_{t}" / "dpo" / "metrics.jsonl") for d in (full, out))
        assert [r["step"] for r in mb] == [r["step"] for r in ma]  # no step lost or repeated
        for ra, rb in zip(ma, mb, strict=True):
            assert abs(ra["loss"] - rb["loss"]) < 1e-6
        wa = load_file(full / f"iter_{t}" / "dpo" / "model" / "model.safetensors")
        wb = load_file(out / f"iter_{t}" / "dpo" / "model" / "model.safetensors")
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, out))
    strip = lambda s: [{k: v for k, v in r.items() if k not in ("seconds", "policy")} for r in s["iterations"]]  # noqa: E731
    assert strip(sa) == strip(sb)
    assert (out / "summary.md").exists() and (out / "report.md").exists()
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old", ".parts"))]
    assert leftovers == []
