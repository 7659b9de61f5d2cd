import random

import pytest

from rlhf_workflow.sandbox import SKILLS, GoldScore, gold_reward, parse_answer, render_response
from rlhf_workflow.sandbox.tasks import FILLERS, make_prompt, solve, wrong_answer


@pytest.mark.parametrize(
    ("meta", "answer"),
    [
        ({"skill": "add", "a": 3, "b": 5}, "8"),
        ({"skill": "add", "a": 9, "b": 9}, "18"),
        ({"skill": "add", "a": 0, "b": 0}, "0"),
        ({"skill": "compare", "a": 37, "b": 52}, "52"),
        ({"skill": "compare", "a": 99, "b": 4}, "99"),
        ({"skill": "sort", "digits": [3, 9, 1]}, "1 3 9"),
        ({"skill": "sort", "digits": [7, 0, 5, 2]}, "0 2 5 7"),
        ({"skill": "reverse", "letters": ["c", "a", "t"]}, "t a c"),
        ({"skill": "reverse", "letters": ["w", "o", "r", "d"]}, "d r o w"),
    ],
)
def test_checker_hand_cases(meta, answer):
    assert solve(meta) == answer
    meta = {**meta, "answer": answer}
    assert gold_reward(meta, f"Answer: {answer}").correct
    assert not gold_reward(meta, f"Answer: {answer}0").correct


def test_prompts_match_their_operands():
    rng = random.Random(0)
    for skill in SKILLS:
        for _ in range(50):
            text, meta = make_prompt(skill, rng)
            assert meta["skill"] == skill and meta["answer"] == solve(meta)
            if skill == "add":
                assert f"{meta['a']}" in text and f"{meta['b']}" in text
                assert 0 <= meta["a"] <= 9 and 0 <= meta["b"] <= 9
            elif skill == "compare":
                assert meta["a"] != meta["b"] and 0 <= min(meta["a"], meta["b"])
                assert max(meta["a"], meta["b"]) <= 99
            elif skill == "sort":
                assert text.endswith(" ".join(map(str, meta["digits"])))
                assert len(meta["digits"]) in (3, 4)
            else:
                assert text.endswith(" ".join(meta["letters"]))
                assert len(meta["letters"]) in (3, 4)
            assert len(text.split()) <= 8


def test_specific_prompt_phrasings():
    texts = {make_prompt("add", random.Random(s))[0].split()[0] for s in range(40)}
    assert texts == {"What", "Add", "Compute"}
    rng = random.Random(1)
    seen = {make_prompt("compare", rng)[0] for _ in range(200)}
    assert any(t.startswith("Which is larger: ") and t.endswith("?") for t in seen)


def test_wrong_answer_has_right_shape_and_is_wrong():
    rng = random.Random(0)
    for skill in SKILLS:
        for _ in range(200):
            _, meta = make_prompt(skill, rng)
            w = wrong_answer(meta, rng)
            assert w != meta["answer"]
            assert len(w.split()) == len(meta["answer"].split())
            if skill == "add":
                assert abs(int(w) - int(meta["answer"])) == 1
            elif skill == "compare":
                assert w == str(min(meta["a"], meta["b"]))
            elif skill == "sort":
                assert sorted(w.split()) == meta["answer"].split()
            else:
                assert sorted(w.split()) == sorted(meta["letters"])


def test_render_response():
    assert render_response("8", []) == "Answer: 8"
    assert render_response("1 3 9", ["Let me think about it."]) == (
        "Let me think about it. Answer: 1 3 9"
    )


def test_fillers_are_short_sentences():
    assert 8 <= len(FILLERS) <= 12 and len(set(FILLERS)) == len(FILLERS)
    for f in FILLERS:
        assert 3 <= len(f.split()) <= 6 and f.endswith(".") and "Answer" not in f


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Answer: 8", "8"),
        ("Good question. Answer: 8", "8"),
        ("no answer here", None),
        ("", None),
        ("Answer: 7 and then Answer: 8", "8"),
        ("Answer:   1    3  9  ", "1 3 9"),
        ("Answer:8", "8"),
        ("Answer:", ""),
        ("answer: 8", None),
    ],
)
def test_parse_answer(response, expected):
    assert parse_answer(response) == expected


META = {"skill": "add", "a": 3, "b": 5, "answer": "8"}


def test_gold_reward_perfect():
    assert gold_reward(META, "Answer: 8") == GoldScore(reward=1.0, correct=True, filler_words=0)


def test_gold_reward_correct_with_two_fillers():
    # "Let me think about it." = 5 words, "Here is my reasoning." = 4 words -> 9 filler words
    response = render_response("8", ["Let me think about it.", "Here is my reasoning."])
    score = gold_reward(META, response)
    assert score.correct and score.filler_words == 9
    assert score.reward == pytest.approx(1.0 - 0.02 * 9)
    assert gold_reward(META, response, filler_penalty=0.1).reward == pytest.approx(0.1)


def test_gold_reward_wrong_answer():
    score = gold_reward(META, "I will work it out. Answer: 9")
    assert not score.correct and score.filler_words == 5
    assert score.reward == pytest.approx(-0.1)


def test_gold_reward_missing_end_of_turn():
    assert gold_reward(META, "Answer: 8", ended=False).reward == pytest.approx(0.5)
    assert gold_reward(META, "Answer: 8", ended=False, eos_penalty=1.0).reward == 0.0
    score = gold_reward(META, "Let me", ended=False)
    assert not score.correct and score.filler_words == 2
    assert score.reward == pytest.approx(-0.04 - 0.5)


def test_gold_reward_counts_words_after_the_answer():
    sort_meta = {"skill": "sort", "digits": [3, 9, 1], "answer": "1 3 9"}
    score = gold_reward(sort_meta, "Answer: 1 3 9 I hope that helps")
    assert not score.correct and score.filler_words == 4
    # an earlier Answer: clause is filler too: only the last one counts
    score = gold_reward(META, "Answer: 7 Answer: 8")
    assert score.correct and score.filler_words == 2
