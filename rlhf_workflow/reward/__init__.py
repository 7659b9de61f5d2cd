"""Reward models: Bradley-Terry scoring (``bt``), the pairwise preference model (``pm``),
PM ranking of n responses (``ranking``) and RewardBench-style evaluation (``bench``)."""

from .bench import rewardbench_scores, subset_accuracy, summarize
from .bt import ensure_pad_token, load_reward_model, read_pairs, score
from .pm import compare, label_token_ids, load_preference_model
from .ranking import Ranking, rank, rank_with_pm

__all__ = [
    "Ranking",
    "compare",
    "ensure_pad_token",
    "label_token_ids",
    "load_preference_model",
    "load_reward_model",
    "rank",
    "rank_with_pm",
    "read_pairs",
    "rewardbench_scores",
    "score",
    "subset_accuracy",
    "summarize",
]
