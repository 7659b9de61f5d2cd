"""``rlhf annotate``: a reward for every response of every rollout.

``kind: bt`` scores each response with a Bradley-Terry reward model (length-sorted batches);
``kind: dpo`` with the DPO implicit reward of a DPO-trained policy against its ``reference``
(:mod:`..reward.implicit`);
``kind: pm`` ranks the n responses of a prompt with a pairwise preference model (knockout
tournament or round robin), whose scores order the responses for pair selection;
``kind: gold`` uses the sandbox's programmatic gold reward (prompts with sandbox ``meta``):
an oracle judge, to tell the loop's own behaviour apart from a reward model's errors. A response
that hit the token limit without stopping can be penalised (``truncation_penalty``).
Chunked and sharded like ``rlhf generate``: a crash loses at most one chunk. With
``annotator.shard`` the judge itself is sharded over the ranks (FSDP2), which then take every
chunk together, each scoring a share of its batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..config import Config, save_config
from ..data.readers import iter_records
from ..data.records import Rollout
from ..distributed import barrier, setup
from ..errors import UserError
from ..manifest import write_manifest
from .chunks import count_records, join_parts, locked, process_chunks, start_parts

Scorer = Callable[[list[Rollout]], list[list[float]]]


class AnnotatorConfig(Config):
    path: str = Field("sfairXC/FsfairX-LLaMA3-RM-v0.1",
                      description="reward model (bt), DPO-trained policy (dpo) or preference model (pm)")
    kind: Literal["bt", "dpo", "pm", "gold"] = Field(
        "bt", description="Bradley-Terry scores, the DPO implicit reward, pairwise-preference ranking, or the "
        "sandbox gold reward")
    reference: str | None = Field(None, description="dpo: the model the DPO policy was trained from")
    beta: float = Field(0.1, gt=0, description="dpo: the implicit reward's beta")
    pm_mode: Literal["tournament", "round_robin"] = Field("tournament", description="PM ranking of the n responses")
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="dtype of the scoring model: fp32 (default) keeps rewards exact; bf16 halves "
        "memory on a GPU but moves rewards by ~1e-2, enough to reorder close responses")
    shard: bool = Field(
        False, description="on several ranks, shard the judge over them (FSDP2; for a judge that does not "
        "fit on one GPU) instead of a whole copy per rank")
    batch_size: int = Field(16, ge=1, description="sequences per forward pass")
    max_length: int = Field(4096, ge=8, description="tokens per scored sequence (prompt cut first)")
    truncation_penalty: float = Field(0.0, ge=0, description="subtracted from responses that hit the token limit")

    @model_validator(mode="after")
    def _dpo_has_reference(self) -> AnnotatorConfig:
        if (self.kind == "dpo") != (self.reference is not None):
            raise ValueError("annotator.reference is the DPO judge's reference: set it with kind=dpo, and only then")
        return self


class AnnotateConfig(Config):
    input: str = Field("rollouts.jsonl", description="rollouts from `rlhf generate`")
    out: str = Field("scored.jsonl", description="rollouts with rewards")
    annotator: AnnotatorConfig = AnnotatorConfig()
    chunk_size: int = Field(256, ge=1, description="prompts per checkpointed chunk")


def make_scorer(cfg: AnnotatorConfig, device: str | None = None) -> Scorer:
    """Load the annotator once; return a function from rollouts to per-response rewards."""
    if cfg.kind == "gold":
        return gold_rewards
    if cfg.kind in ("bt", "dpo"):
        from ..reward.bt import load_reward_model, score

        model, tok = load_reward_model(cfg.path, cfg.dtype, device, cfg.reference, cfg.beta, cfg.shard)

        def bt(rollouts: list[Rollout]) -> list[list[float]]:
            flat = [(ro.messages(), r) for ro in rollouts for r in ro.responses]
            rewards = iter(score(model, tok, [p for p, _ in flat], [r for _, r in flat],
                                 cfg.batch_size, cfg.max_length, progress=False))
            return [[next(rewards) for _ in ro.responses] for ro in rollouts]

        return bt
    from ..reward.pm import load_preference_model
    from ..reward.ranking import rank_with_pm

    model, tok = load_preference_model(cfg.path, cfg.dtype, device, cfg.shard)

    def pm(rollouts: list[Rollout]) -> list[list[float]]:
        ranks = rank_with_pm(model, tok, [ro.messages() for ro in rollouts],
                             [ro.responses for ro in rollouts], cfg.pm_mode, cfg.batch_size, cfg.max_length)
        return [list(r.scores) for r in ranks]

    return pm


def gold_rewards(rollouts: list[Rollout]) -> list[list[float]]:
    """The sandbox gold reward of every response (a response cut by the token limit pays the
    gold missing-EOS price)."""
    from ..sandbox import gold_reward

    out = []
    for ro in rollouts:
        if not ro.meta or "answer" not in ro.meta:
            raise UserError(f"rollout {ro.id!r}: annotator.kind=gold needs sandbox prompts (meta.answer)")
        reasons = ro.finish_reasons or ["stop"] * len(ro.responses)
        out.append([gold_reward(ro.meta, r, ended=why == "stop").reward
                    for r, why in zip(ro.responses, reasons, strict=True)])
    return out


def annotate_records(rollouts: list[Rollout], rewards: list[list[float]], penalty: float) -> list[dict]:
    """Rollouts with their rewards (less ``penalty`` for a response cut by the token limit); a
    judge that returned nan or inf is an error naming the response."""
    out = []
    for ro, rs in zip(rollouts, rewards, strict=True):
        bad = next((j for j, r in enumerate(rs) if not math.isfinite(r)), None)
        if bad is not None:
            raise UserError(f"the judge returned {rs[bad]} for response {bad} of rollout {ro.id!r} "
                            f"({ro.responses[bad][:60]!r}); check the judge (its dtype, its weights)")
        reasons = ro.finish_reasons or ["stop"] * len(rs)
        rs = [r - penalty * (why == "length") for r, why in zip(rs, reasons, strict=True)]
        out.append({**ro.model_dump(exclude_none=True), "rewards": rs})
    return out


def run_annotate(cfg: AnnotateConfig, scorer: Scorer | None = None) -> Path:
    out = Path(cfg.out)
    rank, world, _ = setup()
    with locked(out, rank):
        return _annotate(cfg, out, rank, world, scorer)


def _annotate(cfg: AnnotateConfig, out: Path, rank: int, world: int, scorer: Scorer | None) -> Path:
    if not start_parts(out, cfg.model_dump(mode="json"), rank):
        print(f"annotate: {out} exists already")
        return out
    if rank == 0:
        save_config(cfg, out.with_suffix(".config.yaml"))
        write_manifest(out.parent, cfg, name=out.with_suffix(".manifest.json").name)
    loaded = [scorer]

    def fn(i: int, batch: list[Rollout]) -> list[dict]:
        if loaded[0] is None:
            loaded[0] = make_scorer(cfg.annotator)
        return annotate_records(batch, loaded[0](batch), cfg.annotator.truncation_penalty)

    together = cfg.annotator.shard and world > 1  # a sharded judge: every rank on every chunk
    n_chunks = process_chunks(iter_records(cfg.input, Rollout), out, cfg.chunk_size, *((0, 1) if together else
                              (rank, world)), fn, "annotate", count_records(cfg.input), write=rank == 0 or not together)
    barrier()
    if rank == 0:
        join_parts(out, n_chunks)
        print(f"annotate: {cfg.annotator.kind} rewards for {n_chunks} chunk(s) on {world} process(es)"
              + (", the judge sharded (FSDP2)" if together else "") + f" -> {out}")
    barrier()
    return out
