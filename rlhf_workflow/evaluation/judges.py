"""How good a judge is: ``rlhf rm eval`` / ``rlhf pm eval`` (a BT reward model, a DPO model's
implicit reward, or a pairwise preference model on RewardBench v1 pairs or v2 best-of-4, or any
pair file, scored as the official leaderboards do; the rules are in :mod:`.rewardbench`). The
held-out evaluation the judge trainers run counts pairs the same way
(:mod:`rlhf_workflow.reward.metrics`).

The format follows the records (``format=auto``): ``chosen`` / ``rejected`` as strings (or
conversations) are v1 pairs; lists of strings are v2 best-of-n records. Without ``--in`` the
hub's ``allenai/reward-bench`` (``filtered``) or, with ``format=v2``,
``allenai/reward-bench-2`` (``test``) is read.

- v1: a pair is won when the judge prefers the chosen response (BT: ``r(chosen) >
  r(rejected)``; PM: order-averaged ``P(chosen > rejected) > 0.5``).
- v2: the BT model scores every response; the PM ranks the responses of a prompt
  (``pm_mode``: round robin by default, or the loop's knockout tournament; the Ties subset is
  always ranked by round robin, as its formula needs every response's score).

A table goes to the terminal, the full result to JSON.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from ..config import Config, ModelConfig
from ..data import readers
from ..data.readers import fmt_counts, read_pairs, validated_rows
from ..data.records import Conversation, Id, Record, as_messages
from ..distributed import rank_and_world
from ..errors import UserError
from ..io import write_json
from ..losses import bt_loss
from ..models.loading import pad_id
from ..reward.bt import load_reward_model, score_tokenized
from ..reward.encoding import encode
from ..reward.pm import compare, load_preference_model
from ..reward.ranking import rank_with_pm
from .rewardbench import (
    PRIOR_SECTION,
    SECTIONS,
    Scored,
    is_ties,
    rewardbench2_scores,
    summarize,
    ties_key,
)

HUB = {"v1": ("allenai/reward-bench", "filtered"), "v2": ("allenai/reward-bench-2", "test")}


class _EvalConfig(Config):
    input: str | None = Field(
        None, description="records: file or hub dataset; v1 pairs (prompt, chosen, rejected, subset?) or v2 "
        "best-of-n (prompt, chosen: [str], rejected: [str], subset, id) (default: allenai/reward-bench, "
        "or allenai/reward-bench-2 with format=v2)")
    split: str | None = Field(
        None, description="split, for hub datasets (default: filtered for allenai/reward-bench, else test)")
    format: Literal["auto", "v1", "v2"] = Field(
        "auto", description="RewardBench v1 (pairs) or v2 (best-of-n); auto: from the first record's fields")
    ties: Literal["zero", "half"] = Field(
        "zero", description="v1: a pair whose two scores are equal counts 0 (official) or half")
    prior_sets: bool = Field(
        False, description="v1: add the prior sets (anthropic_helpful, anthropic_hhh, shp, summarize) as a fifth "
        "section at half weight, as the RewardBench paper's leaderboard; off: today's leaderboard")
    out: str | None = Field(
        None, description="JSON result file (default: print the JSON after the table)"
    )
    batch_size: int = Field(32, ge=1, description="sequences per forward pass")
    on_bad: Literal["error", "skip"] = Field(
        "error", description="invalid record: fail or skip and count"
    )
    progress: bool = Field(True, description="show a progress bar")


class RMEvalConfig(_EvalConfig):
    model: ModelConfig = ModelConfig(path="runs/rm/model")
    reference: str | None = Field(
        None, description="score the DPO implicit reward of the causal LM model.path against this reference "
        "(the model it was DPO-trained from), instead of a BT reward model's head")
    beta: float = Field(0.1, gt=0, description="the implicit reward's beta (with reference)")
    max_length: int = Field(2048, ge=16, description="tokens per sequence (prompt + response)")
    max_prompt_length: int | None = Field(
        None, ge=1, description="prompt tokens kept when too long (default max_length // 2)"
    )


class PMEvalConfig(_EvalConfig):
    model: ModelConfig = ModelConfig(path="runs/pm/model")
    max_length: int = Field(
        3072, ge=16, description="tokens per comparison (context + both responses)"
    )
    pm_mode: Literal["round_robin", "tournament"] = Field(
        "round_robin", description="v2: how the PM ranks a prompt's responses (Ties: always round robin)")


# --------------------------------------------------------------------------- reading


class BestOfNRecord(Record):
    """A v2 record: a prompt, its correct responses (``chosen``) and the others."""

    prompt: str | Conversation
    chosen: list[str] = Field(min_length=1)
    rejected: list[str] = Field(min_length=1)
    num_correct: int | None = None
    subset: str | None = None
    id: Id | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str | Conversation) -> str | Conversation:
        if not (v.strip() if isinstance(v, str) else any(m.content.strip() for m in v)):
            raise ValueError("must not be empty or only whitespace")
        return v

    @field_validator("chosen", "rejected")
    @classmethod
    def _responses_not_blank(cls, v: list[str]) -> list[str]:
        if not all(x.strip() for x in v):
            raise ValueError("a response is empty or only whitespace")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BestOfNRecord:
        if self.num_correct is not None and self.num_correct != len(self.chosen):
            raise ValueError(f"num_correct: {self.num_correct}, but chosen holds {len(self.chosen)} responses")
        if is_ties(self.subset) and ties_key(str(self.id)) is None:
            raise ValueError(f"id: a Ties record's id is 'ref:N' or 'tied:N', got {self.id!r}")
        return self


@dataclass(frozen=True)
class BestOfN:
    """A v2 record as scored: the prompt and its responses, the ``num_correct`` correct ones first."""

    where: str
    id: str
    subset: str | None
    prompt: list[dict]
    responses: list[str]
    num_correct: int


def resolve_input(cfg: _EvalConfig) -> tuple[str, str, str]:
    """(format, source, split) of an eval config."""
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect_format(cfg.input, _split(cfg.input, cfg.split)) if cfg.input else "v1"
    source = cfg.input or HUB[fmt][0]
    return fmt, source, _split(source, cfg.split)


def _split(source: str | None, split: str | None) -> str:
    return split or ("filtered" if source == HUB["v1"][0] else "test")


def detect_format(source: str, split: str) -> str:
    """``v2`` when the first record has ``num_correct`` or ``chosen`` is a list of strings."""
    rows = readers.iter_rows(source, split)
    try:
        _, row = next(rows)
    except StopIteration:
        raise UserError(f"{source}: no records") from None
    finally:
        rows.close()
    chosen = row.get("chosen") if isinstance(row, dict) else None
    strings = isinstance(chosen, list) and bool(chosen) and all(isinstance(x, str) for x in chosen)
    return "v2" if strings or (isinstance(row, dict) and "num_correct" in row) else "v1"


def read_best_of_n(source: str, split: str = "test", on_bad: str = "error") -> tuple[list[BestOfN], Counter]:
    """Validated v2 records and the count of skipped ones per reason (as ``read_pairs``)."""
    skipped: Counter = Counter()
    out = [BestOfN(at, str(r.id) if r.id is not None else str(n), r.subset, as_messages(r.prompt, "user"),
                   r.chosen + r.rejected, len(r.chosen))
           for n, (at, r, _) in enumerate(validated_rows(source, BestOfNRecord, split,
                                                         skipped if on_bad == "skip" else None))]
    if not out:
        raise UserError(f"{source}: no valid best-of-n records"
                        + (f" ({fmt_counts(skipped)} skipped)" if skipped else ""))
    return out, skipped


# --------------------------------------------------------------------------- commands


def run_rm_eval(cfg: RMEvalConfig) -> dict:
    fmt, source, split = resolve_input(cfg)
    if fmt == "v1":
        rows, skipped = read_pairs(source, split, cfg.on_bad)
        model, tokenizer = load_reward_model(cfg.model, reference=cfg.reference, beta=cfg.beta)
        seqs, truncated = _encode(cfg, tokenizer, [(r.pair.conversations()[0], resp) for r in rows
                                                    for resp in r.pair.conversations()[1:]])
        r = _score(cfg, model, tokenizer, seqs)
        diffs = [c - j for c, j in zip(r[::2], r[1::2], strict=True)]
        result = summarize([row.pair.subset for row in rows], diffs, cfg.ties, cfg.prior_sets)
        result["loss"] = bt_loss(torch.tensor(diffs), torch.zeros(len(diffs))).mean().item()  # (held-out BT loss)
        return _report(cfg, result, source, _rm_kind(cfg), skipped, truncated)
    records, skipped = read_best_of_n(source, split, cfg.on_bad)
    model, tokenizer = load_reward_model(cfg.model, reference=cfg.reference, beta=cfg.beta)
    seqs, truncated = _encode(cfg, tokenizer, [(rec.prompt, [{"role": "assistant", "content": text}])
                                                for rec in records for text in rec.responses])
    values = iter(_score(cfg, model, tokenizer, seqs))
    scores = [[next(values) for _ in rec.responses] for rec in records]
    return _report(cfg, _v2(records, scores), source, _rm_kind(cfg), skipped, truncated)


def _rm_kind(cfg: RMEvalConfig) -> str:
    return "bt" if cfg.reference is None else f"dpo (reference {cfg.reference}, beta {cfg.beta})"


def _encode(cfg: RMEvalConfig, tokenizer, items: list[tuple[list[dict], list[dict]]]) -> tuple[list, int]:
    """Each (prompt, response) as the judge reads it for scoring (every response gets a score:
    a response too long for ``max_length`` loses its start); and how many were truncated."""
    encoded = [encode(tokenizer, prompt, response, cfg.max_length, cfg.max_prompt_length)
               for prompt, response in items]
    return [tok for tok, _ in encoded], sum(cut for _, cut in encoded)


def _score(cfg: RMEvalConfig, model, tokenizer, seqs) -> list[float]:
    return score_tokenized(model, seqs, pad_id(tokenizer), cfg.batch_size, cfg.progress, shard=True)


def run_pm_eval(cfg: PMEvalConfig) -> dict:
    fmt, source, split = resolve_input(cfg)
    if fmt == "v1":
        rows, skipped = read_pairs(source, split, cfg.on_bad)
        model, tokenizer = load_preference_model(cfg.model)
        items = []
        for row in rows:
            prompt, chosen, rejected = row.pair.conversations()
            items.append((prompt, chosen[-1]["content"], rejected[-1]["content"]))
        c = compare(model, tokenizer, items, cfg.batch_size, cfg.max_length, cfg.progress, shard=True)
        result = summarize([r.pair.subset for r in rows], [p - 0.5 for p in c.probs], cfg.ties, cfg.prior_sets)
        return _report(cfg, result, source, "pm", skipped, c.truncated)
    records, skipped = read_best_of_n(source, split, cfg.on_bad)
    model, tokenizer = load_preference_model(cfg.model)
    scores: list[list[float]] = [[] for _ in records]
    ties = [i for i, r in enumerate(records) if is_ties(r.subset)]
    rest = [i for i, r in enumerate(records) if not is_ties(r.subset)]
    for idx, mode in ((rest, cfg.pm_mode), (ties, "round_robin")):
        if idx:
            ranks = rank_with_pm(model, tokenizer, [records[i].prompt for i in idx],
                                 [records[i].responses for i in idx], mode, cfg.batch_size,
                                 cfg.max_length, cfg.progress)
            for i, rk in zip(idx, ranks, strict=True):
                scores[i] = list(rk.scores)
    return _report(cfg, _v2(records, scores), source, f"pm ({cfg.pm_mode})", skipped, None)


def _v2(records: list[BestOfN], scores: list[list[float]]) -> dict:
    return rewardbench2_scores([Scored(r.id, r.subset, s, r.num_correct)
                                for r, s in zip(records, scores, strict=True)])


def _report(cfg: _EvalConfig, result: dict, source: str, judge: str, skipped: Counter,
            truncated: int | None) -> dict:
    result.update(model=cfg.model.path, input=source, judge=judge, truncated=truncated,
                  skipped_invalid=dict(skipped))
    if rank_and_world()[0] != 0:  # every rank scored its share; one reports
        return result
    print(format_table(result))
    extra = ("" if truncated is None
             else f"{truncated} {'pairs' if result['format'] == 'v1' else 'responses'} truncated to "
                  f"max_length {cfg.max_length}")
    extra += (f"{'; ' if extra else ''}skipped invalid: {fmt_counts(skipped)}" if skipped else "")
    if extra:
        print(extra)
    if cfg.out:
        write_json(cfg.out, result)
        print(f"-> {cfg.out}")
    else:
        print(json.dumps(result))
    return result


# --------------------------------------------------------------------------- table


def _pct(v: float) -> str:
    return f"{100 * v:>8.1f}%"


def format_table(result: dict) -> str:
    return _table_v2(result) if result.get("format") == "v2" else _table_v1(result)


def _table_v1(result: dict) -> str:
    lines = [f"{'subset':<26} {'n':>6} {'accuracy':>9} {'ties':>5}"]
    lines += [f"{s:<26} {r['n']:>6} {_pct(r['accuracy'])} {r['ties']:>5}" for s, r in result["subsets"].items()]
    notes = []
    if result["kind"] == "rewardbench":
        lines.append("")
        for name, members in SECTIONS.items():
            if name in result["sections"]:
                k = sum(m in result["subsets"] for m in members)
                lines.append(f"{name:<26} {'':>6} {_pct(result['sections'][name])}   {k} of {len(members)} subsets")
            else:
                lines.append(f"{name:<26} {'':>6} {'missing':>9}   no pairs of its {len(members)} subsets")
        if PRIOR_SECTION in result["sections"]:
            lines.append(f"{PRIOR_SECTION + ' (half weight)':<26} {'':>6} {_pct(result['sections'][PRIOR_SECTION])}")
        n_sec = len(result["sections"]) - (PRIOR_SECTION in result["sections"])
        how = (f"mean of the {n_sec} section{'s' * (n_sec != 1)}"
               + (" present" if result["missing_sections"] else "")
               + (", Prior Sets at half weight" if PRIOR_SECTION in result["sections"] else ""))
        if result["missing_sections"]:
            notes.append(f"missing: {', '.join(result['missing_sections'])}; the overall covers the sections "
                         "present only, not comparable with the leaderboard's (the official scorer counts a "
                         "missing section as 0)")
        if result["prior_sets"] == "not counted":
            notes.append("prior sets in the file are not counted (prior_sets=true adds them at half weight, as "
                         "the RewardBench paper's leaderboard)")
    else:
        how = "all pairs"
    if result["overall"] is not None:
        lines.append(f"{'overall':<26} {result['n']:>6} {_pct(result['overall'])}   {how}")
    rule = "0 (official)" if result["tie_rule"] == "zero" else "half (ties=half; the official rule counts 0)"
    notes.append(f"ties: {result['ties']} pairs scored equal, each counted {rule}")
    return "\n".join(lines + notes)


def _table_v2(result: dict) -> str:
    lines = [f"{'subset':<26} {'n':>6} {'score':>9} {'tied top':>9}"]
    for s, r in result["subsets"].items():
        tail = "  (Ties formula)" if is_ties(s) else ""
        lines.append(f"{s:<26} {r['n']:>6} {_pct(r['accuracy'])} {r['tied_top']:>9}{tail}")
    k = len(result["subsets"])
    if result["overall"] is not None:
        lines.append(f"{'overall':<26} {result['n']:>6} {_pct(result['overall'])}   "
                     f"unweighted mean of the {k} subset{'s' * (k != 1)}")
    if result["missing_subsets"]:
        lines.append(f"missing: {', '.join(result['missing_subsets'])}; the overall is the mean of the subsets "
                     "present, not comparable with the leaderboard's (all six)")
    lines.append("tied top: prompts whose top score is shared; the chosen then gets 1/k of a point")
    return "\n".join(lines)


# --------------------------------------------------------------------------- held-out evaluation
