import subprocess
import sys

import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.data.readers import read_records
from rlhf_workflow.data.records import Rollout
from rlhf_workflow.io import write_jsonl
from rlhf_workflow.reward.bt import load_reward_model, score
from rlhf_workflow.reward.pm import compare, load_preference_model

ROLLOUTS = [
    {"id": f"r{i}", "prompt": f"What is {i} + 1?", "meta": {"skill": "add", "answer": str(i + 1)},
     "responses": [f"Answer: {i + 1}", "Let me think about it. Answer: 3", f"Answer: {i}", "Answer:"],
     "finish_reasons": ["stop", "stop", "length", "stop"], "num_tokens": [4, 10, 4, 2]}
    for i in range(7)
]


@pytest.fixture()
def rollouts(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    write_jsonl(path, ROLLOUTS)
    return path


def test_bt_annotate_cli_matches_direct_scores_and_penalises_truncation(rollouts, trained_rm, tmp_path):
    out = tmp_path / "scored.jsonl"
    assert main(["annotate", "--in", str(rollouts), "--out", str(out), f"annotator.path={trained_rm}",
                 "annotator.truncation_penalty=0.5", "chunk_size=3"]) == 0  # (the judge's default dtype: fp32)
    scored = read_records(out, Rollout)
    assert [s.id for s in scored] == [r["id"] for r in ROLLOUTS] and scored[0].meta["skill"] == "add"
    model, tok = load_reward_model(trained_rm, "fp32")
    direct = score(model, tok, [[{"role": "user", "content": r["prompt"]}] for r in ROLLOUTS for _ in r["responses"]],
                   [x for r in ROLLOUTS for x in r["responses"]], progress=False)
    got = [x for s in scored for x in s.rewards]
    penalty = [0.5 * (why == "length") for r in ROLLOUTS for why in r["finish_reasons"]]
    assert got == pytest.approx([d - p for d, p in zip(direct, penalty, strict=True)], abs=1e-5)


def test_pm_annotate_ranks_every_response_as_its_comparisons_say(rollouts, trained_pm, tmp_path):
    """The scores follow from the PM's own order-averaged comparisons, computed here directly:
    round robin = mean P(win) over the other three; tournament = the knockout's champion first
    and the losers' bracket's last one worst."""
    model, tok = load_preference_model(trained_pm)
    for mode in ("tournament", "round_robin"):
        out = tmp_path / f"scored-{mode}.jsonl"
        assert main(["annotate", "--in", str(rollouts), "--out", str(out), f"annotator.path={trained_pm}",
                     "annotator.kind=pm", f"annotator.pm_mode={mode}"]) == 0
        for s in read_records(out, Rollout):
            p = {(i, j): q for (i, j), q in zip(
                [(i, j) for i in range(4) for j in range(i + 1, 4)],
                compare(model, tok, [(s.messages(), s.responses[i], s.responses[j])
                                     for i in range(4) for j in range(i + 1, 4)]).probs, strict=True)}
            if mode == "round_robin":
                expected = [sum(p[(i, j)] if i < j else 1 - p[(j, i)] for j in range(4) if j != i) / 3
                            for i in range(4)]
                assert s.rewards == pytest.approx(expected, abs=1e-6)
                continue
            first = lambda i, j, p=p: p[(i, j)] >= 0.5  # noqa: E731  (P = 0.5 goes to the first of the two)
            w1, l1 = (0, 1) if first(0, 1) else (1, 0)
            w2, l2 = (2, 3) if first(2, 3) else (3, 2)
            champion = w1 if first(w1, w2) else w2
            worst = l2 if first(l1, l2) else l1
            assert s.rewards.index(max(s.rewards)) == champion and s.rewards.index(min(s.rewards)) == worst


def test_two_processes_give_the_same_scores(rollouts, trained_rm, tmp_path):
    args = ["annotate", "--in", str(rollouts), f"annotator.path={trained_rm}", "annotator.dtype=fp32",
            "chunk_size=2"]
    assert main([*args, "--out", str(tmp_path / "one.jsonl")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rlhf_workflow.cli", *args, "--out", str(tmp_path / "two.jsonl")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{-(-len(ROLLOUTS) // 2)} chunk(s) on 2 process(es)" in res.stdout
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


@pytest.mark.parametrize("kind", ["bt", "pm"])
def test_a_judge_sharded_over_two_ranks_gives_the_same_scores(kind, rollouts, trained_rm, trained_pm, tmp_path):
    """annotator.shard: the judge is sharded with FSDP2 and both ranks score every chunk
    together, each a share of its batches; the file is the one-process file."""
    judge = trained_rm if kind == "bt" else trained_pm
    args = ["annotate", "--in", str(rollouts), f"annotator.path={judge}", f"annotator.kind={kind}",
            "annotator.batch_size=3", "chunk_size=4"]
    assert main([*args, "--out", str(tmp_path / "one.jsonl")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rlhf_workflow.cli", *args, "annotator.shard=true", "--out", str(tmp_path / "two.jsonl")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 chunk(s) on 2 process(es), the judge sharded" in res.stdout
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_gold_annotator_gives_the_sandbox_reward(rollouts, tmp_path):
    out = tmp_path / "gold.jsonl"
    assert main(["annotate", "--in", str(rollouts), "--out", str(out), "annotator.kind=gold"]) == 0
    first = read_records(out, Rollout)[0]  # "What is 0 + 1?"
    assert first.rewards[:3] == pytest.approx([1.0, -0.1, -0.5])  # right, wrong + 5 filler words, wrong and cut
    bad = tmp_path / "no_meta.jsonl"
    write_jsonl(bad, [{"prompt": "hi", "responses": ["a"]}])
    assert main(["annotate", "--in", str(bad), "--out", str(tmp_path / "x.jsonl"), "annotator.kind=gold"]) == 2


def test_function_and_combined_judges_give_their_components_scores(rollouts, trained_rm, tmp_path):
    """The built-in checker alone gives 1 for the right answer only; BT + 0.5 x checker gives the
    BT model's score plus half the checker's, each component kept in scored.jsonl."""
    checker = "rlhf_workflow.reward.functions:exact_answer"
    out = tmp_path / "checker.jsonl"
    assert main(["annotate", "--in", str(rollouts), "--out", str(out), "annotator.kind=function",
                 f"annotator.function={checker}"]) == 0
    assert [s.rewards for s in read_records(out, Rollout)] == [[1.0, float(i == 2), 0.0, 0.0] for i in range(7)]
    out = tmp_path / "combined.jsonl"
    assert main(["annotate", "--in", str(rollouts), "--out", str(out),
                 f'annotator.combine=[{{kind: bt, path: "{trained_rm}", weight: 1.0}}, '
                 f'{{kind: function, function: "{checker}", weight: 0.5, name: checker}}]']) == 0
    scored = read_records(out, Rollout)
    model, tok = load_reward_model(trained_rm, "fp32")
    bt = score(model, tok, [[{"role": "user", "content": r["prompt"]}] for r in ROLLOUTS for _ in r["responses"]],
               [x for r in ROLLOUTS for x in r["responses"]], progress=False)
    checked = [x for i in range(7) for x in (1.0, float(i == 2), 0.0, 0.0)]
    assert [x for s in scored for x in s.reward_components["bt"]] == pytest.approx(bt, abs=1e-5)
    assert [x for s in scored for x in s.reward_components["checker"]] == checked
    assert [x for s in scored for x in s.rewards] == pytest.approx(
        [b + 0.5 * c for b, c in zip(bt, checked, strict=True)], abs=1e-5)
