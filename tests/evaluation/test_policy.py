import pytest

from rlhf_workflow.data.records import Prompt
from rlhf_workflow.evaluation.policy import gold_metrics
from rlhf_workflow.generation.hf import Sample


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
