"""The built-in sandbox: tiny tasks with a programmatic gold reward (see ``tasks``)."""

from .generate import (
    MakeDataConfig,
    corpus,
    make_data,
    make_preferences,
    make_prompts,
    make_sft,
)
from .tasks import SKILLS, GoldScore, gold_reward, parse_answer, render_response

__all__ = [
    "SKILLS",
    "GoldScore",
    "MakeDataConfig",
    "corpus",
    "gold_reward",
    "make_data",
    "make_preferences",
    "make_prompts",
    "make_sft",
    "parse_answer",
    "render_response",
]
