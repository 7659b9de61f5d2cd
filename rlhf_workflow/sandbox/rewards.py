"""The sandbox's gold reward as a reward function (``annotator.kind: function`` with
``annotator.function: rlhf_workflow.sandbox.rewards:gold``; ``kind: gold`` is the same judge):
an oracle, to tell the loop's own behaviour apart from a reward model's errors."""

from __future__ import annotations

from ..data.records import Rollout
from ..errors import UserError
from ..reward.functions import record_of
from .tasks import gold_reward

GOLD = "rlhf_workflow.sandbox.rewards:gold"


def gold(record: dict, responses: list[str]) -> list[float]:
    """The gold reward of each response; one cut by the token limit pays the missing-EOS price."""
    meta = record.get("meta")
    if not meta or "answer" not in meta:
        raise UserError(f"prompt {record.get('id')!r}: the gold reward needs sandbox prompts (meta.answer)")
    reasons = record.get("finish_reasons") or ["stop"] * len(responses)
    return [gold_reward(meta, r, ended=why == "stop").reward for r, why in zip(responses, reasons, strict=True)]


def gold_rewards(rollouts: list[Rollout]) -> list[list[float]]:
    """The gold reward of every response of every rollout."""
    return [gold(record_of(ro), ro.responses) for ro in rollouts]
