"""``rlhf annotate``: a reward for every response of every rollout.

``kind: bt`` scores each response with a Bradley-Terry reward model (length-sorted batches);
``kind: dpo`` with the DPO implicit reward of a DPO-trained policy against its ``reference``
(:mod:`..reward.implicit`);
``kind: pm`` ranks the n responses of a prompt with a pairwise preference model (knockout
tournament or round robin), whose scores order the responses for pair selection;
``kind: function`` calls a reward function named by ``function: package.module:name`` (the
contract and the built-in math checker: :mod:`..reward.functions`); ``kind: gold`` is the
sandbox's programmatic gold reward (prompts with sandbox ``meta``), the function
``rlhf_workflow.sandbox.rewards:gold``: an oracle judge, to tell the loop's own behaviour apart
from a reward model's errors. ``combine: [{kind: bt, path: ..., weight: 1.0}, {kind: function,
function: ..., weight: 0.5}]`` scores with the weighted sum of several judges, each
component's scores kept in ``scored.jsonl`` (``reward_components``). A response that hit the
token limit without stopping can be penalised (``truncation_penalty``).
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
    kind: Literal["bt", "dpo", "pm", "gold", "function", "combine"] = Field(
        "bt", description="Bradley-Terry scores, the DPO implicit reward, pairwise-preference ranking, the "
        "sandbox gold reward, a reward function (function), or the weighted sum of the judges in combine")
    function: str | None = Field(None, description="function: the reward function, 'package.module:name', "
                                 "called as fn(record, responses) -> one float per response")
    combine: list[JudgeComponent] | None = Field(
        None, description="judges whose weighted scores are summed (each: kind, path or function, weight, "
        "name); setting it makes kind combine")
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

    @model_validator(mode="before")
    @classmethod
    def _combine_sets_kind(cls, data):
        if isinstance(data, dict) and data.get("combine") and data.get("kind", "bt") == "bt":  # (bt: the default)
            data = {**data, "kind": "combine"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AnnotatorConfig:
        if (self.kind == "dpo") != (self.reference is not None):
            raise ValueError("annotator.reference is the DPO judge's reference: set it with kind=dpo, and only then")
        if (self.kind == "function") != (self.function is not None):
            raise ValueError("annotator.function names the reward function of kind=function: set both or neither")
        if (self.kind == "combine") != bool(self.combine):
            raise ValueError("annotator.combine lists the judges of kind=combine: give the list, and leave kind "
                             "at its default (or combine)")
        if self.combine:
            names = [c.label() for c in self.combine]
            if len(set(names)) < len(names):
                raise ValueError(f"annotator.combine: two components named alike ({names}); give each a name")
        return self


class JudgeComponent(AnnotatorConfig):
    """One judge of ``annotator.combine``."""

    weight: float = Field(1.0, description="its scores' weight in the sum")
    name: str | None = Field(None, description="its key in scored.jsonl's reward_components (default: the "
                             "function's name, or the kind)")

    @model_validator(mode="after")
    def _a_single_judge(self) -> JudgeComponent:
        if self.kind in ("combine", "pm"):
            raise ValueError(f"annotator.combine: a component of kind {self.kind} (a PM gives rank scores, not "
                             "rewards, and a combination cannot nest); use bt, dpo, gold or function")
        if self.truncation_penalty:
            raise ValueError("annotator.combine: set truncation_penalty on the annotator, not on a component")
        return self

    def label(self) -> str:
        return self.name or (self.function.rpartition(":")[2] if self.function else self.kind)


AnnotatorConfig.model_rebuild()


class AnnotateConfig(Config):
    input: str = Field("rollouts.jsonl", description="rollouts from `rlhf generate`")
    out: str = Field("scored.jsonl", description="rollouts with rewards")
    annotator: AnnotatorConfig = AnnotatorConfig()
    chunk_size: int = Field(256, ge=1, description="prompts per checkpointed chunk")


def make_scorer(cfg: AnnotatorConfig, device: str | None = None) -> Scorer:
    """Load the annotator once; return a function from rollouts to per-response rewards."""
    judges = make_judges(cfg, device)
    if cfg.kind != "combine":
        return judges[0][2]
    return lambda rollouts: weighted_sum(judges, [s(rollouts) for _, _, s in judges])


def make_judges(cfg: AnnotatorConfig, device: str | None = None) -> list[tuple[str, float, Scorer]]:
    """(name, weight, scorer) of each judge: the one, or those of ``combine``."""
    if cfg.kind == "combine":
        return [(c.label(), c.weight, make_scorer(c, device)) for c in cfg.combine]
    return [(cfg.kind, 1.0, _single(cfg, device))]


def weighted_sum(judges: list[tuple[str, float, Scorer]], parts: list[list[list[float]]]) -> list[list[float]]:
    """Sum over judges of weight x score, per response."""
    return [[sum(w * p[i][j] for (_, w, _), p in zip(judges, parts, strict=True)) for j in range(len(row))]
            for i, row in enumerate(parts[0])]


def _single(cfg: AnnotatorConfig, device: str | None) -> Scorer:
    if cfg.kind in ("gold", "function"):
        from ..reward.functions import function_scorer
        from ..sandbox.rewards import GOLD

        return function_scorer(GOLD if cfg.kind == "gold" else cfg.function)
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


def annotate_records(rollouts: list[Rollout], rewards: list[list[float]], penalty: float,
                     components: dict[str, list[list[float]]] | None = None) -> list[dict]:
    """Rollouts with their rewards (less ``penalty`` for a response cut by the token limit) and,
    for a combined judge, each component's scores; a judge that returned nan or inf is an error
    naming the response."""
    out = []
    for i, (ro, rs) in enumerate(zip(rollouts, rewards, strict=True)):
        bad = next((j for j, r in enumerate(rs) if not math.isfinite(r)), None)
        if bad is not None:
            raise UserError(f"the judge returned {rs[bad]} for response {bad} of rollout {ro.id!r} "
                            f"({ro.responses[bad][:60]!r}); check the judge (its dtype, its weights)")
        reasons = ro.finish_reasons or ["stop"] * len(rs)
        rs = [r - penalty * (why == "length") for r, why in zip(rs, reasons, strict=True)]
        row = {**ro.model_dump(exclude_none=True), "rewards": rs}
        if components:
            row["reward_components"] = {name: c[i] for name, c in components.items()}
        out.append(row)
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
    loaded = [None if scorer is None else [("judge", 1.0, scorer)]]

    def fn(i: int, batch: list[Rollout]) -> list[dict]:
        if loaded[0] is None:
            loaded[0] = make_judges(cfg.annotator)
        judges = loaded[0]
        parts = [s(batch) for _, _, s in judges]
        components = dict(zip((name for name, _, _ in judges), parts, strict=True))
        return annotate_records(batch, weighted_sum(judges, parts), cfg.annotator.truncation_penalty,
                                components if cfg.annotator.kind == "combine" else None)

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
