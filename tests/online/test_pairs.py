import random

import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.data.readers import read_records
from rlhf_workflow.data.records import PreferencePair, Rollout
from rlhf_workflow.io import write_jsonl
from rlhf_workflow.online.pairs import SelectConfig, build_pairs, select_pair

R = [0.2, 0.9, -0.4, 0.5]
L = [10, 400, 20, 30]


def pick(strategy, rewards=R, lengths=L, seed=0, **kw):
    return select_pair(rewards, lengths, SelectConfig(strategy=strategy, **kw), random.Random(seed))


def test_strategies_on_a_hand_made_table():
    assert pick("max_min") == (1, 2)
    assert pick("max_max") == (1, 3)
    for seed in range(20):
        c, r = pick("max_random", seed=seed)
        assert c == 1 and r in (0, 2, 3)
        c, r = pick("random", seed=seed)
        assert R[c] > R[r]
    assert {pick("max_random", seed=s)[1] for s in range(30)} == {0, 2, 3}


def test_length_penalty_flips_the_choice():
    # 0.9 - 0.002*400 = 0.1 falls below 0.5 - 0.002*30 = 0.44 and 0.2 - 0.02 = 0.18
    assert pick("max_min", length_penalty=0.002) == (3, 2)
    assert pick("max_max", length_penalty=0.002) == (3, 0)


def test_ties_and_margins_are_dropped():
    assert pick("max_min", rewards=[0.5, 0.5, 0.5, 0.5]) is None  # all equal
    assert pick("max_max", rewards=[1.0, 1.0, 0.0, 0.0]) is None  # best two tie
    assert pick("max_min", min_margin=1.4) is None and pick("max_min", min_margin=1.2) == (1, 2)
    assert pick("max_min", rewards=[0.3], lengths=[1]) is None


def test_build_pairs_counts_and_keeps_order(tmp_path):
    rows = [
        {"id": "a", "prompt": "p1", "responses": ["x", "yy", "zzz"], "rewards": [0.1, 0.7, 0.3], "meta": {"k": 1}},
        {"id": "b", "prompt": "p2", "responses": ["x", "y"], "rewards": [0.0, 0.0]},
        {"id": "c", "prompt": [{"role": "user", "content": "p3"}], "responses": ["u", "v"], "rewards": [-1, 2]},
    ]
    src = tmp_path / "scored.jsonl"
    write_jsonl(src, rows)
    assert main(["pairs", "--in", str(src), "--out", str(tmp_path / "pairs.jsonl")]) == 0
    pairs = read_records(tmp_path / "pairs.jsonl", PreferencePair)
    assert [p.id for p in pairs] == ["a", "c"]
    assert (pairs[0].chosen, pairs[0].rejected) == ("yy", "x")
    assert pairs[0].meta == {"k": 1, "chosen_reward": 0.7, "rejected_reward": 0.1, "chosen_index": 1,
                             "rejected_index": 0}
    assert pairs[1].chosen == "v" and pairs[1].conversations()[0] == [{"role": "user", "content": "p3"}]
    _, stats = build_pairs(read_records(src, Rollout), SelectConfig())
    assert stats == {"prompts": 3, "pairs": 2, "dropped_ties": 1}


def test_unscored_rollouts_are_an_error():
    with pytest.raises(Exception, match="needs one reward per response"):
        build_pairs([Rollout(prompt="p", responses=["a", "b"])], SelectConfig())


def test_an_empty_sampled_response_is_kept_and_equal_texts_are_dropped(tmp_path):
    """A policy that ends its turn at once wrote an empty response: it is a pair to train
    against (the dataset rule against empty responses does not apply to sampled pairs); two
    equal texts scored apart teach nothing and are dropped."""
    rows = [{"id": "a", "prompt": "p1", "responses": ["good", ""], "rewards": [0.9, -2.0]},
            {"id": "b", "prompt": "p2", "responses": ["same", "same"], "rewards": [0.2, 0.1]}]
    src = tmp_path / "scored.jsonl"
    write_jsonl(src, rows)
    pairs, stats = build_pairs(read_records(src, Rollout), SelectConfig())
    assert stats == {"prompts": 2, "pairs": 1, "dropped_ties": 1}
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    (pair,) = read_records(tmp_path / "pairs.jsonl", PreferencePair)
    assert (pair.chosen, pair.rejected, pair.sampled) == ("good", "", True)
    pairs[0]["sampled"] = False  # the same row as a dataset row is a broken one
    write_jsonl(tmp_path / "data.jsonl", pairs)
    with pytest.raises(Exception, match="line 1: field 'rejected': must not be empty or only whitespace"):
        read_records(tmp_path / "data.jsonl", PreferencePair)
