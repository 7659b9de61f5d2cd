import subprocess
import sys

import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.config import load_config
from rlhf_workflow.data.readers import read_records
from rlhf_workflow.data.records import Prompt, Rollout
from rlhf_workflow.online.generate import GenerateConfig, make_generator, run_generate


def _args(tiny_model, sandbox_data, out, *extra):
    return [f"model.path={tiny_model}", f"input={sandbox_data / 'prompts_eval.jsonl'}", f"out={out}",
            "sampling.n=3", "sampling.max_new_tokens=8", "chunk_size=7", "limit=20", *extra]


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

    def flaky(prompts, sampling):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(prompts, sampling)

    with pytest.raises(KeyboardInterrupt):
        run_generate(crashing, generator=flaky)
    assert sorted(p.name for p in (tmp_path / "r.jsonl.parts").iterdir()) == [
        "chunk-000000.jsonl", "chunk-000001.jsonl", "settings.json"]
    calls.clear()
    run_generate(crashing, generator=flaky)
    assert calls == [6]  # only the third chunk (prompts 14..19) was generated again
    assert (tmp_path / "r.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()


def test_parts_of_other_settings_are_never_reused_and_leftovers_are_removed(tiny_model, sandbox_data, tmp_path):
    out = tmp_path / "r.jsonl"
    cfg = load_config(GenerateConfig, None, _args(tiny_model, sandbox_data, out))
    real, calls = make_generator(cfg), []

    def crash_on_second(prompts, sampling):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(prompts, sampling)

    with pytest.raises(KeyboardInterrupt):
        run_generate(cfg, generator=crash_on_second)
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
