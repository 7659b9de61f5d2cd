import json
import math
from pathlib import Path

import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.data.records import Prompt
from rlhf_workflow.evaluation.policy import (
    clustered_se,
    default_out,
    gold_metrics,
    paired_difference,
)
from rlhf_workflow.generation.sampling import Sample
from rlhf_workflow.sandbox import gold_reward, parse_answer


def test_gold_metrics_hand_computed():
    add = Prompt(prompt="What is 3 + 5?", meta={"skill": "add", "a": 3, "b": 5, "answer": "8"})
    rev = Prompt(prompt="Reverse: c a t", meta={"skill": "reverse", "letters": ["c", "a", "t"], "answer": "t a c"})
    samples = [
        [Sample("Answer: 8", "stop", 4), Sample("Let me think. Answer: 8", "stop", 8)],
        [Sample("Answer: t a c", "length", 6), Sample("Answer: c a t", "stop", 6)],
    ]
    r = gold_metrics([add, rev], samples)
    # rewards: 1.0, 1 - 0.02*3 = 0.94, 1 - 0.5 (no end of turn) = 0.5, 0.0
    assert r["gold_reward"] == pytest.approx((1.0 + 0.94 + 0.5 + 0.0) / 4)
    assert r["accuracy"] == pytest.approx(0.75)
    assert r["eos_rate"] == pytest.approx(0.75) and r["mean_tokens"] == pytest.approx(6)
    assert r["per_skill"]["add"]["gold_reward"] == pytest.approx(0.97)
    assert r["per_skill"]["reverse"]["n"] == 2
    # clustered by prompt: prompt means 0.97 and 0.25, their sd 0.72 / sqrt(2), over sqrt(2)
    assert r["gold_reward_se"] == pytest.approx(0.36)


def test_standard_errors_by_hand():
    groups = [[1, 0], [1, 1], [0, 0]]  # prompt means 0.5, 1, 0: sd 0.5, over sqrt(3)
    assert clustered_se(groups) == pytest.approx(0.5 / 3 ** 0.5)
    # unequal groups: each prompt's sum of residuals from the overall mean 4/6
    uneven = [[1], [0, 1], [1, 0, 1]]
    m = 4 / 6
    sums = [1 - m, (0 - m) + (1 - m), (1 - m) + (0 - m) + (1 - m)]
    assert clustered_se(uneven) == pytest.approx((3 / 2 * sum(x * x for x in sums)) ** 0.5 / 6)
    assert math.isnan(clustered_se([[1.0, 0.0, 1.0]]))  # one prompt: no standard error
    # paired: per-prompt differences 0.5, 0.5, 0 -> mean 1/3, sd sqrt(1/12), over sqrt(3)
    d = paired_difference(groups, [[0, 0], [1, 0], [0, 0]])
    assert d["diff"] == pytest.approx(1 / 3) and d["se"] == pytest.approx((1 / 12) ** 0.5 / 3 ** 0.5)
    assert d["prompts"] == 3


def test_default_output_folder_is_named_after_the_model_path():
    assert default_out("runs/demo/sft/model") == Path("runs/eval_policy/demo-sft-model")
    assert default_out("/data/models/smol") == Path("runs/eval_policy/data-models-smol")
    assert default_out("HuggingFaceTB/SmolLM2-135M-Instruct") == Path("runs/eval_policy/HuggingFaceTB-SmolLM2-135M-Instruct")


def test_eval_policy_keeps_every_sample_with_its_verdict(tiny_model, sandbox_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tiny_model.iterdir())
    assert main(["eval", "policy", f"model.path={tiny_model}", f"prompts={sandbox_data / 'prompts_eval.jsonl'}",
                 "limit=6", "sampling.n=2", "sampling.max_new_tokens=8"]) == 0
    out = tmp_path / default_out(str(tiny_model))
    assert f"-> {default_out(str(tiny_model))}" in capsys.readouterr().out
    assert sorted(p.name for p in tiny_model.iterdir()) == before  # nothing written into the model folder
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    prompts = [json.loads(x) for x in (sandbox_data / "prompts_eval.jsonl").read_text().splitlines()[:6]]
    assert [(s["id"], s["sample"]) for s in samples] == [(p["id"], k) for p in prompts for k in range(2)]
    for s, p in zip(samples, [p for p in prompts for _ in range(2)], strict=True):
        assert s["prompt"] == p["prompt"] and s["gold_answer"] == p["meta"]["answer"]
        assert s["answer"] == parse_answer(s["response"]) and s["correct"] == (s["answer"] == s["gold_answer"])
        g = gold_reward(p["meta"], s["response"], ended=s["finish_reason"] == "stop")
        assert s["gold_reward"] == g.reward
    assert metrics["n"] == len(samples) == 12
    assert metrics["gold_reward"] == pytest.approx(sum(s["gold_reward"] for s in samples) / 12)
    assert metrics["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 12)
    assert (out / "config.yaml").is_file()
    # against a baseline evaluation on the same prompts: the difference of prompt means, paired
    base = tmp_path / "base"
    base.mkdir()
    fake = [{**x, "gold_reward": 0.25 * (i % 4)} for i, x in enumerate(samples)]
    (base / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in fake))
    assert main(["eval", "policy", f"model.path={tiny_model}", f"prompts={sandbox_data / 'prompts_eval.jsonl'}",
                 "limit=6", "sampling.n=2", "sampling.max_new_tokens=8", f"baseline={base}", f"out={tmp_path / 'b'}"]) == 0
    against = json.loads((tmp_path / "b" / "metrics.json").read_text())["against_baseline"]
    diffs = [(samples[2 * i]["gold_reward"] + samples[2 * i + 1]["gold_reward"] - fake[2 * i]["gold_reward"]
              - fake[2 * i + 1]["gold_reward"]) / 2 for i in range(6)]
    assert against["diff"] == pytest.approx(sum(diffs) / 6) and against["prompts"] == 6
    assert "(paired by prompt, 6 prompts)" in capsys.readouterr().out
    assert main(["eval", "policy", f"model.path={tiny_model}", f"prompts={sandbox_data / 'prompts_eval.jsonl'}",
                 "limit=5", "sampling.n=2", "sampling.max_new_tokens=8", f"baseline={base}", f"out={tmp_path / 'c'}"]) == 2
    assert "was evaluated on other prompts (6 against 5" in capsys.readouterr().err
