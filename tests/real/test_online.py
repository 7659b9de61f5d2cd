"""generate -> annotate (BT and PM) -> pairs on the pretrained model, and one `rlhf loop`
iteration with the same stages plus DPO and evaluation."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.real


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def test_generate_n_per_prompt(rollouts, data):
    got = read(rollouts)
    prompts = read(data / "prompts_train.jsonl")[:4]
    assert [r["id"] for r in got] == [p["id"] for p in prompts]
    for r in got:
        assert len(r["responses"]) == len(r["finish_reasons"]) == len(r["num_tokens"]) == 4
        assert all(0 < n <= 24 for n in r["num_tokens"])
        assert all(why in ("stop", "length") for why in r["finish_reasons"])
        assert all(n < 24 for n, why in zip(r["num_tokens"], r["finish_reasons"], strict=True) if why == "stop")
    assert any(why == "stop" for r in got for why in r["finish_reasons"])  # the SFT model ends its turns


def test_annotate_and_pairs(rollouts, reward_model, preference_model, tier, tmp_path):
    bt, pm = tmp_path / "bt.jsonl", tmp_path / "pm.jsonl"
    tier.run("annotate", f"input={rollouts}", f"out={bt}", f"annotator.path={reward_model}", "annotator.kind=bt",
             "annotator.max_length=128")
    tier.run("annotate", f"input={rollouts}", f"out={pm}", f"annotator.path={preference_model}",
             "annotator.kind=pm", "annotator.max_length=192")
    for path in (bt, pm):
        scored = read(path)
        assert [r["responses"] for r in scored] == [r["responses"] for r in read(rollouts)]
        assert all(len(r["rewards"]) == 4 and all(math.isfinite(x) for x in r["rewards"]) for r in scored)
    # a PM knockout over 4 responses: rounds survived (2 for the winner), -1 for the loser of the losers
    assert all(sorted(r["rewards"]) == [-1, 0, 1, 2] for r in read(pm))
    out = tmp_path / "pairs.jsonl"
    tier.run("pairs", f"input={bt}", f"out={out}")
    scored = {r["id"]: r for r in read(bt)}
    made = read(out)
    assert made and len(made) <= 4
    for p in made:  # best of 4 vs worst of 4 under the reward model
        r, m = scored[p["id"]], p["meta"]
        assert m["chosen_reward"] == max(r["rewards"]) > m["rejected_reward"] == min(r["rewards"])
        assert p["chosen"] == r["responses"][m["chosen_index"]] and p["rejected"] == r["responses"][m["rejected_index"]]


def test_one_loop_iteration(sft_model, reward_model, data, tier, tmp_path):
    out = tmp_path / "loop"
    tier.run("loop", f"out={out}", "iterations=1", f"policy.path={sft_model}",
             f"prompts.source={data / 'prompts_train.jsonl'}", "prompts.per_iteration=4",
             "generate.sampling.n=4", "generate.sampling.max_new_tokens=24",
             f"annotate.annotator.path={reward_model}", "annotate.annotator.max_length=128",
             "dpo.data.max_length=128", "dpo.optim.lr=1e-5", *tier.train_args(None, 4, 2, prefix="dpo.train"),
             f"eval.prompts={data / 'prompts_eval.jsonl'}", "eval.limit=2", "eval.sampling.n=2",
             "eval.sampling.max_new_tokens=16")
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("rm_reward", "gold_reward", "mean_tokens", "eos_rate"))
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and math.isfinite(rows[1]["kl"])
    assert 1 <= rows[1]["pairs"] <= 4 and rows[1]["seconds"]["dpo"] > 0
    assert len(read(out / "iter_1" / "rollouts.jsonl")) == 4
    assert tier.metrics(out / "iter_1" / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)


def test_one_loop_iteration_judged_by_the_answer_checker_alone(sft_model, data, tier, tmp_path):
    """The built-in exact-answer checker as the only judge: every response's reward is the
    checker's verdict on it, and each pair is a right answer over a wrong one; the iterations'
    numbers reach TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf_workflow.data.records import Rollout
    from rlhf_workflow.reward.functions import exact_answer, record_of

    out = tmp_path / "loop"
    tier.run("loop", f"out={out}", "iterations=1", f"policy.path={sft_model}",
             f"prompts.source={data / 'prompts_train.jsonl'}", "prompts.per_iteration=8",
             "generate.sampling.n=4", "generate.sampling.max_new_tokens=24", "annotate.annotator.kind=function",
             "annotate.annotator.function=rlhf_workflow.reward.functions:exact_answer",
             "dpo.data.max_length=128", "dpo.optim.lr=1e-5", *tier.train_args(None, 4, 2, prefix="dpo.train"),
             f"eval.prompts={data / 'prompts_eval.jsonl'}", "eval.limit=2", "eval.sampling.n=2",
             "eval.sampling.max_new_tokens=16", "report_to=[tensorboard]")
    scored = [Rollout.model_validate(r) for r in read(out / "iter_1" / "scored.jsonl")]
    assert all(ro.rewards == exact_answer(record_of(ro), ro.responses) for ro in scored)
    right = {(ro.id, r) for ro in scored for r, x in zip(ro.responses, ro.rewards, strict=True) if x == 1.0}
    pairs = read(out / "iter_1" / "pairs.jsonl")
    assert pairs and all((p["id"], p["chosen"]) in right and (p["id"], p["rejected"]) not in right for p in pairs)
    rows = json.loads((out / "summary.json").read_text())["iterations"]
    assert math.isfinite(rows[1]["rm_reward"]) and math.isfinite(rows[1]["gold_reward"])  # the checker's, on held-out
    events = EventAccumulator(str(out / out.name))
    events.Reload()
    for key in ("gold_reward", "rm_reward", "mean_tokens"):
        assert {e.step: e.value for e in events.Scalars(key)} == pytest.approx(
            {r["iteration"]: r[key] for r in rows}, rel=1e-6), key


def test_win_rate_of_the_sft_model_against_the_instruct_model(sft_model, real_model, reward_model, data, tier,
                                                               tmp_path):
    """`rlhf eval winrate` with the BT judge: each pair's preference is sigmoid of the two rewards'
    difference, the rewards computed here directly."""
    from rlhf_workflow.reward.bt import load_reward_model, score

    out = tmp_path / "winrate"
    tier.run("eval", "winrate", f"policy.path={sft_model}", f"baseline.path={real_model}",
             f"judge.path={reward_model}", "judge.max_length=128", f"prompts={data / 'prompts_eval.jsonl'}",
             "sampling.n=2", "sampling.max_new_tokens=16", "bootstrap=100", f"out={out}")
    result = json.loads((out / "winrate.json").read_text())
    rows = read(out / "samples.jsonl")
    prompts = {r["id"]: [{"role": "user", "content": r["prompt"]}] for r in read(data / "prompts_eval.jsonl")}
    model, tok = load_reward_model(reward_model)
    rewards = {side: score(model, tok, [prompts[r["id"]] for r in rows], [r[side] for r in rows],
                           max_length=128, progress=False) for side in ("policy", "baseline")}
    prefs = [1 / (1 + math.exp(b - a)) for a, b in zip(rewards["policy"], rewards["baseline"], strict=True)]
    assert len(rows) == 8 and [r["preference"] for r in rows] == pytest.approx(prefs, abs=1e-5)
    assert result["win_rate"] == pytest.approx(sum(prefs) / len(prefs), abs=1e-5)
    assert math.isfinite(result["lc_win_rate"]) and result["win_rate_se"] > 0
