"""Sandbox skills with a programmatic gold reward.

Four tiny skills (``add``, ``compare``, ``sort``, ``reverse``). A prompt carries a ``meta`` dict
holding everything its checker needs; a response is optional filler sentences followed by the
answer clause ``Answer: X``. The gold reward is what an ideal judge would pay: 1 for the right
answer, minus a small price per filler word, minus a larger one when the response never ended
(no end-of-turn). Reward models and policies are measured against it.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ANSWER_TAG = "Answer:"

FILLERS: tuple[str, ...] = (
    "Let me think about it.",
    "That is a good question.",
    "I will work it out.",
    "Here is my reasoning.",
    "This one is quite easy.",
    "Let me check carefully.",
    "I am happy to help.",
    "Thanks for asking me this.",
    "Let us go step by step.",
    "I know how to do this.",
    "The solution is simple.",
    "Here is what I found.",
)

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class GoldScore:
    """Gold judgement of one response: ``reward`` = correct - price of filler - missing EOS."""

    reward: float
    correct: bool
    filler_words: int


@dataclass(frozen=True)
class Skill:
    """One task: how to draw operands, phrase the prompt, solve it and answer it wrongly."""

    name: str
    phrasings: tuple[str, ...]
    sample: Callable[[random.Random], dict[str, Any]]  # operands, formatted into a phrasing
    solve: Callable[[dict[str, Any]], str]
    wrong: Callable[[dict[str, Any], random.Random], str]


def _words(xs: list) -> str:
    return " ".join(str(x) for x in xs)


def _swap_adjacent(xs: list, rng: random.Random) -> list:
    i = rng.randrange(len(xs) - 1)
    ys = list(xs)
    ys[i], ys[i + 1] = ys[i + 1], ys[i]
    return ys


def _sample_compare(rng: random.Random) -> dict[str, int]:
    a, b = rng.sample(range(100), 2)
    return {"a": a, "b": b}


def _wrong_add(m: dict, rng: random.Random) -> str:
    s = m["a"] + m["b"]
    return str(s + 1 if s == 0 else s + rng.choice((-1, 1)))


def _wrong_sort(m: dict, rng: random.Random) -> str:
    return _words(_swap_adjacent(sorted(m["digits"]), rng))


def _wrong_reverse(m: dict, rng: random.Random) -> str:
    rev = list(reversed(m["letters"]))
    return _words(m["letters"] if rng.random() < 0.5 else _swap_adjacent(rev, rng))


_SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill(
            "add",
            ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}."),
            lambda r: {"a": r.randint(0, 9), "b": r.randint(0, 9)},
            lambda m: str(m["a"] + m["b"]),
            _wrong_add,
        ),
        Skill(
            "compare",
            ("Which is larger: {a} or {b}?", "Pick the larger number: {a} or {b}."),
            _sample_compare,
            lambda m: str(max(m["a"], m["b"])),
            lambda m, r: str(min(m["a"], m["b"])),
        ),
        Skill(
            "sort",
            ("Sort: {digits}", "Sort ascending: {digits}"),
            lambda r: {"digits": r.sample(range(10), r.choice((3, 4)))},
            lambda m: _words(sorted(m["digits"])),
            _wrong_sort,
        ),
        Skill(
            "reverse",
            ("Reverse: {letters}", "Write backwards: {letters}"),
            lambda r: {"letters": r.sample(LETTERS, r.choice((3, 4)))},
            lambda m: _words(reversed(m["letters"])),
            _wrong_reverse,
        ),
    )
}

SKILLS: tuple[str, ...] = tuple(_SKILLS)


def get_skill(name: str) -> Skill:
    if name not in _SKILLS:
        raise ValueError(f"unknown skill {name!r}; valid skills: {', '.join(SKILLS)}")
    return _SKILLS[name]


def make_prompt(skill: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """Draw one prompt of ``skill``; returns (prompt text, meta with skill, answer, operands).

    Digits and letters are distinct within a prompt, so a wrong answer can always differ.
    """
    s = get_skill(skill)
    ops = s.sample(rng)
    text = rng.choice(s.phrasings).format(**{k: _fmt(v) for k, v in ops.items()})
    meta = {"skill": skill, **ops}
    meta["answer"] = s.solve(meta)
    return text, meta


def _fmt(v: Any) -> str:
    return _words(v) if isinstance(v, list) else str(v)


def solve(meta: dict[str, Any]) -> str:
    """The right answer recomputed from the operands in ``meta`` (the exact checker)."""
    return get_skill(meta["skill"]).solve(meta)


def wrong_answer(meta: dict[str, Any], rng: random.Random) -> str:
    """A plausible wrong answer of the right shape; never equal to ``meta["answer"]``."""
    return get_skill(meta["skill"]).wrong(meta, rng)


def render_response(answer: str, fillers: list[str] | tuple[str, ...] = ()) -> str:
    """Filler sentences (if any) followed by the answer clause ``Answer: X``."""
    return " ".join([*fillers, f"{ANSWER_TAG} {answer}"])


def parse_answer(response: str) -> str | None:
    """Text after the last ``Answer:``, whitespace-normalised; None if there is none."""
    i = response.rfind(ANSWER_TAG)
    if i < 0:
        return None
    return " ".join(response[i + len(ANSWER_TAG) :].split())


def count_filler_words(meta: dict[str, Any], response: str) -> int:
    """Words outside the final answer clause: all words before the last ``Answer:`` plus any
    words after the answer-sized span that follows it (as many words as ``meta["answer"]``)."""
    i = response.rfind(ANSWER_TAG)
    if i < 0:
        return len(response.split())
    before = len(response[:i].split())
    after = len(response[i + len(ANSWER_TAG) :].split())
    return before + max(0, after - len(meta["answer"].split()))


def gold_reward(
    meta: dict[str, Any],
    response: str,
    ended: bool = True,
    filler_penalty: float = 0.02,
    eos_penalty: float = 0.5,
) -> GoldScore:
    """Gold reward = 1[parsed answer == meta answer] - filler_penalty * filler words
    - eos_penalty if the response did not stop with an end-of-turn (``ended=False``).

    The ideal response is exactly ``Answer: <right answer>`` followed by end-of-turn (reward 1).
    """
    correct = parse_answer(response) == meta["answer"]
    filler = count_filler_words(meta, response)
    reward = float(correct) - filler_penalty * filler - (0.0 if ended else eos_penalty)
    return GoldScore(reward=reward, correct=correct, filler_words=filler)
