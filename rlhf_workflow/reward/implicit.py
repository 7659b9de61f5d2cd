"""The DPO implicit reward as a judge: ``r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))``.

A policy DPO-trained on preference pairs defines a reward model (Rafailov et al., 2023), and
RewardBench scores DPO models this way, each with its reference. Here it is a judge like a BT
model, in the same places: ``rlhf rm eval model.path=DPO reference=REF`` (held-out pairs and
RewardBench) and the online loop's annotator (``annotator.kind=dpo annotator.reference=REF``).
It reads an answer with the LM head that answers the question, so it can check an answer
against its prompt, which a scalar head trained with the BT loss may never learn to do
(docs/preregistration.md).

Both models are causal LMs loaded in the judge's dtype; their summed response log-probs come
from :func:`..models.logprobs.response_logps` (the LM head runs at response tokens only).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..models.loading import load_tokenizer
from ..models.logprobs import response_logps
from .encoding import uses_chat_template


class ImplicitReward(torch.nn.Module):
    """A (policy, reference) pair read as a reward model: ``forward(batch)`` gives one reward
    per row of a padded batch of (prompt + response) rows whose targets mark the response."""

    def __init__(self, policy, reference, beta: float):
        super().__init__()
        self.policy, self.reference, self.beta = policy, reference, beta

    def forward(self, batch: dict) -> torch.Tensor:
        from ..training.engine import reshard

        policy = response_logps(self.policy, batch)
        reshard(self.policy)  # sharded: its gathered root weights go before the reference's come
        return self.beta * (policy - response_logps(self.reference, batch))


def load_implicit_reward(spec: ModelConfig, reference: str, beta: float,
                         shard: bool = False) -> tuple[ImplicitReward, object]:
    """(judge, tokenizer): the DPO policy ``spec`` and its ``reference``, both in ``spec.dtype``,
    each sharded over the ranks with ``shard`` (:func:`..training.engine.load_frozen`)."""
    from ..training.engine import load_frozen

    tokenizer = load_tokenizer(spec)
    if not uses_chat_template(tokenizer):
        raise UserError(f"{spec.path}: the DPO implicit reward needs a causal LM with a chat template")
    policy, _ = load_frozen(spec, shard)
    ref, _ = load_frozen(spec.model_copy(update={"path": reference, "tokenizer": None}), shard)
    if policy.get_output_embeddings().weight.shape != ref.get_output_embeddings().weight.shape:
        raise UserError(f"the DPO policy {spec.path} and its reference {reference} have different "
                        "vocabularies; the reference must be the model the policy was trained from")
    return ImplicitReward(policy, ref, beta), tokenizer
