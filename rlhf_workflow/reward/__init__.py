"""Judges: the Bradley-Terry reward model (``bt``, reading text as ``encoding`` renders it),
the pairwise preference model (``pm``) and PM ranking of n responses (``ranking``). Their
held-out evaluation during training is beside each (``evaluate_bt``, ``evaluate_pm``, counted by
``metrics``); RewardBench's is in :mod:`rlhf_workflow.evaluation.judges`."""

from .bt import load_reward_model, score
from .encoding import ensure_pad_token
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
    "score",
]
