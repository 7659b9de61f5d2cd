"""The reproducibility manifest (manifest.py) and its section in `rlhf report`."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from rlhf_workflow import manifest as mf
from rlhf_workflow.config import load_config
from rlhf_workflow.manifest import build_manifest, discover, file_sha256, git_state, write_manifest
from rlhf_workflow.online.loop import LoopConfig
from rlhf_workflow.report import ReportConfig, run_report
from rlhf_workflow.training.dpo import DPOConfig

REPO = Path(mf.__file__).resolve().parent.parent


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_file_sha256_reads_big_files_in_blocks(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * 2**20))
    tracemalloc.start()
    digest = file_sha256(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert digest == _sha(big)
    assert peak < 4 * 2**20  # a 24 MiB file, never held whole


def test_manifest_of_a_stage(tiny_model, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    out = tmp_path / "dpo"
    out.mkdir()
    (out / "stale.jsonl").write_text("{}\n")  # an output folder's files are not inputs
    cfg = load_config(DPOConfig, None, [f"model.path={tiny_model}", f"data.train={pairs}",
                                        f"train.output_dir={out}", "train.seed=7"])
    path = write_manifest(out, cfg)
    m = json.loads(path.read_text())

    assert m["inputs"] == [{"path": str(pairs), "bytes": pairs.stat().st_size, "sha256": _sha(pairs)}]
    model = m["models"]["model"]
    assert model["config_sha256"] == _sha(tiny_model / "config.json")
    assert model["generation_config_sha256"] == _sha(tiny_model / "generation_config.json")
    assert model["weights"] == [["model.safetensors", (tiny_model / "model.safetensors").stat().st_size]]
    assert model["tokenizer"]["tokenizer.json"] == _sha(tiny_model / "tokenizer.json")
    assert m["seeds"] == {"train.seed": 7}
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert m["config_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    cfg.optim.lr = 1e-6
    assert build_manifest(cfg)["config_sha256"] != m["config_sha256"]

    import torch
    import transformers

    assert m["versions"]["python"] == platform.python_version()
    assert m["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert m["versions"]["transformers"] == transformers.__version__
    assert m["hardware"]["cpu_count"] == os.cpu_count()
    assert m["hardware"]["gpus"] == [{"name": torch.cuda.get_device_name(i), "memory_gib": pytest.approx(
        torch.cuda.get_device_properties(i).total_memory / 2**30, abs=0.1)} for i in range(torch.cuda.device_count())]
    if (REPO / ".git").exists():
        assert m["git"]["commit"] == _git(REPO, "rev-parse", "HEAD")


def test_git_state(tmp_path):
    """A checkout's package folder: commit, dirty, the diff's hash, untracked files. A package
    folder that is not the checkout's own (installed inside another repository) or outside
    any checkout: None."""
    repo = tmp_path / "repo"
    pkg = repo / "rlhf_workflow"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    assert git_state(pkg.resolve()) is None  # not a checkout yet
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "init")
    state = git_state(pkg.resolve())
    assert state == {"commit": _git(repo, "rev-parse", "HEAD"), "dirty": False}
    (pkg / "a.py").write_text("x = 2\n")
    (pkg / "b.py").write_text("y = 1\n")
    state = git_state(pkg.resolve())
    diff = _git(repo, "diff", "HEAD", "--", "rlhf_workflow") + "\n"
    assert state["dirty"] and state["untracked"] == ["rlhf_workflow/b.py"]
    assert state["diff_sha256"] == hashlib.sha256(diff.encode()).hexdigest()
    nested = repo / "venv" / "site-packages" / "rlhf_workflow"
    nested.mkdir(parents=True)
    assert git_state(nested.resolve()) is None


def test_vllm_is_looked_up_without_importing_it(monkeypatch):
    import importlib.metadata
    import importlib.util

    real_spec, real_version = importlib.util.find_spec, importlib.metadata.version
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: "0.9.1" if d == "vllm" else real_version(d))
    assert mf.versions()["vllm"] == "0.9.1" and "vllm" not in sys.modules


def test_discovery_in_a_loop_config(tiny_model, trained_rm, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "q"}\n')
    (tmp_path / "run").mkdir()
    cfg = load_config(LoopConfig, None, [f"out={tmp_path / 'run'}", f"policy.path={tiny_model}",
                                         f"prompts.source={prompts}", f"annotate.annotator.path={trained_rm}",
                                         "eval.prompts=org/held-out-prompts"])
    inputs, models, hub = discover(cfg)
    assert inputs == [str(prompts)]
    assert models == {"policy": (str(tiny_model), None), "annotate.annotator.path": (str(trained_rm), None)}
    assert hub == {"eval.prompts": "org/held-out-prompts"}  # "(set by the loop)" paths are skipped
    assert discover(DPOConfig())[2] == {}  # data.train="runs/pairs.jsonl", absent: a file, not a hub name


def test_history_keeps_a_manifest_of_another_setting(tmp_path, monkeypatch):
    write_manifest(tmp_path, {"seed": 1})
    write_manifest(tmp_path, {"seed": 1})
    assert not (tmp_path / "manifest.history.jsonl").exists()  # only time and command changed
    first = json.loads((tmp_path / "manifest.json").read_text())
    monkeypatch.setattr(mf, "versions", lambda: {"python": "3.99"})
    write_manifest(tmp_path, {"seed": 1})
    [old] = [json.loads(x) for x in (tmp_path / "manifest.history.jsonl").read_text().splitlines()]
    assert old == first and json.loads((tmp_path / "manifest.json").read_text())["versions"] == {"python": "3.99"}


def test_report_shows_the_manifests(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "q"}\n')
    run = tmp_path / "run"
    write_manifest(run, {"seed": 3, "prompts": str(data)})
    stage = run / "iter_1" / "dpo"
    write_manifest(stage, {"seed": 3})
    m = json.loads((stage / "manifest.json").read_text())
    m["versions"]["torch"] = "0.0.1"
    (stage / "manifest.json").write_text(json.dumps(m))

    run_report(ReportConfig(run_dir=str(run)))  # a manifest and no summary.json
    md = (run / "report.md").read_text()
    assert "## Reproducibility" in md and "- seeds: seed=3" in md
    assert f"| {data} | {data.stat().st_size} | `{_sha(data)[:12]}` |" in md
    assert "| iter_1/dpo/manifest.json |" in md and "| 0.0.1 |" in md
    assert md.rstrip().endswith("| versions |")  # the stage's torch differs from the run's
    if (REPO / ".git").exists():
        assert f"git `{_git(REPO, 'rev-parse', 'HEAD')[:10]}`" in md

    (run / "summary.json").write_text(json.dumps({"iterations": [{"iteration": 0, "gold_reward": 0.25}]}))
    run_report(ReportConfig(run_dir=str(run)))
    md = (run / "report.md").read_text()
    assert md.index("## Policies") < md.index("## Reproducibility")
    assert "<h2>Reproducibility</h2>" in (run / "report.html").read_text()
    with pytest.raises(Exception, match="no summary.json and no manifest.json"):
        run_report(ReportConfig(run_dir=str(tmp_path / "nothing")))
