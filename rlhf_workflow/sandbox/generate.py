"""Seeded sandbox datasets: prompts, SFT demonstrations, noisy preference pairs, a corpus.

Everything is drawn from ``random.Random`` with a seed derived from the caller's seed and the
dataset kind, so the same seed always gives the same records. The SFT data is deliberately
imperfect (wrong answers, filler sentences) and the simulated annotator is noisy and
length-biased, so every RLHF stage has room to improve and a gold reward to be judged by.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from ..config import Config
from ..io import write_json, write_jsonl
from .tasks import (
    ANSWER_TAG,
    FILLERS,
    LETTERS,
    SKILLS,
    get_skill,
    gold_reward,
    make_prompt,
    render_response,
    wrong_answer,
)


def _rng(seed: int, kind: str) -> random.Random:
    """A generator private to one dataset kind (string seeds are stable across runs)."""
    return random.Random(f"{kind}:{seed}")


def _fillers(rng: random.Random, k: int) -> list[str]:
    return rng.sample(FILLERS, k)


def make_prompts(n: int, seed: int, skills: list[str] | None = None) -> list[dict[str, Any]]:
    """``n`` prompts ``{"id": "p-<seed>-<i>", "prompt", "meta"}``, skills in round-robin."""
    skills = list(skills or SKILLS)
    for s in skills:
        get_skill(s)  # fail early on an unknown name
    rng = _rng(seed, "prompts")
    out = []
    for i in range(n):
        text, meta = make_prompt(skills[i % len(skills)], rng)
        out.append({"id": f"p-{seed}-{i}", "prompt": text, "meta": meta})
    return out


def make_sft(n: int, seed: int, error_rate: float = 0.3, filler_rate: float = 0.5, max_fillers: int = 3,
             skills: list[str] | None = None) -> list[dict[str, Any]]:
    """``n`` chat demonstrations ``{"messages": [user, assistant], "meta"}``.

    With probability ``error_rate`` the demonstrated answer is wrong; with probability
    ``filler_rate`` it is preceded by 1..``max_fillers`` filler sentences. ``meta`` adds
    ``demo_correct`` and ``n_fillers`` to the prompt's meta.
    """
    rng = _rng(seed, "sft")
    out = []
    for p in make_prompts(n, seed, skills):
        meta = p["meta"]
        correct = rng.random() >= error_rate
        answer = meta["answer"] if correct else wrong_answer(meta, rng)
        k = rng.randint(1, max_fillers) if max_fillers > 0 and rng.random() < filler_rate else 0
        messages = [
            {"role": "user", "content": p["prompt"]},
            {"role": "assistant", "content": render_response(answer, _fillers(rng, k))},
        ]
        out.append(
            {"messages": messages, "meta": {**meta, "demo_correct": correct, "n_fillers": k}}
        )
    return out


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def make_preferences(n: int, seed: int, temperature: float = 0.25, length_bias: float = 0.05,
                     chat_fraction: float = 0.5, skills: list[str] | None = None) -> list[dict[str, Any]]:
    """``n`` pairs ``{"prompt", "chosen", "rejected", "subset", "meta"}`` labelled by a
    simulated annotator.

    ``reasoning`` pairs: one right and one wrong answer, 0..3 filler sentences each.
    ``chat`` pairs: both right, different numbers of filler sentences (style only).
    The annotator prefers ``a`` with probability
    ``sigmoid((g(a) - g(b) + length_bias * (words(a) - words(b))) / temperature)``, g the gold
    reward, and the label is sampled from it. As ``length_bias`` (0.05/word) exceeds the gold
    filler price (0.02/word), reward models trained on these pairs learn a verbosity bias.
    ``meta["p_chosen"]`` is the annotator's probability of the emitted label.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    rng = _rng(seed, "prefs")
    out = []
    for p in make_prompts(n, seed, skills):
        meta = p["meta"]
        subset = "chat" if rng.random() < chat_fraction else "reasoning"
        if subset == "chat":
            ka, kb = rng.sample(range(4), 2)
            wrong = meta["answer"]
        else:
            ka, kb = rng.randint(0, 3), rng.randint(0, 3)
            wrong = wrong_answer(meta, rng)
        a = render_response(meta["answer"], _fillers(rng, ka))
        b = render_response(wrong, _fillers(rng, kb))
        assert a != b, "a preference pair must differ"
        ga, gb = gold_reward(meta, a).reward, gold_reward(meta, b).reward
        margin = ga - gb + length_bias * (len(a.split()) - len(b.split()))
        p_a = _sigmoid(margin / temperature)
        a_wins = rng.random() < p_a
        chosen, rejected = (a, b) if a_wins else (b, a)
        g_chosen, g_rejected = (ga, gb) if a_wins else (gb, ga)
        out.append(
            {
                "prompt": p["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "subset": subset,
                "meta": {
                    **meta,
                    "id": p["id"],
                    "p_chosen": p_a if a_wins else 1.0 - p_a,
                    "gold_chosen": g_chosen,
                    "gold_rejected": g_rejected,
                },
            }
        )
    return out


def corpus(seed: int = 0) -> list[str]:
    """A few thousand strings covering the whole sandbox vocabulary, for training a tokenizer:
    every phrasing and filler, all digits, numbers 0-99 and letters, ``Answer:`` and the
    preference-model label words ``A`` and ``B``."""
    rng = _rng(seed, "corpus")
    texts: list[str] = [ANSWER_TAG, "A", "B", *FILLERS, *LETTERS]
    texts += [str(i) for i in range(100)]
    texts += [" ".join(LETTERS), " ".join(str(i) for i in range(10))]
    for name in SKILLS:
        texts += [ph.replace("{", "").replace("}", "") for ph in get_skill(name).phrasings]
    for p in make_prompts(1500, seed):
        k = rng.randint(0, 3)
        answer = p["meta"]["answer"] if rng.random() < 0.7 else wrong_answer(p["meta"], rng)
        texts += [p["prompt"], render_response(answer, _fillers(rng, k))]
    return texts


class MakeDataConfig(Config):
    """``rlhf sandbox make-data``: write the sandbox's prompts, SFT data and preference pairs."""

    out: str = Field("runs/sandbox-data", description="folder the data files are written to")
    seed: int = Field(0, description="base seed; each file uses its own seed derived from it")
    n_train_prompts: int = Field(2000, ge=1, description="prompts for online generation")
    n_eval_prompts: int = Field(200, ge=1, description="held-out prompts for gold evaluation")
    n_sft: int = Field(4000, ge=1, description="SFT demonstrations")
    n_prefs: int = Field(4000, ge=1, description="preference pairs for reward-model training")
    n_prefs_test: int = Field(500, ge=1, description="preference pairs for reward-model testing")
    error_rate: float = Field(0.3, ge=0, le=1, description="share of SFT demos with a wrong answer")
    filler_rate: float = Field(0.5, ge=0, le=1, description="share of SFT demos with filler")
    annotator_temperature: float = Field(
        0.25, gt=0, description="noise of the simulated annotator (higher = noisier labels)"
    )
    length_bias: float = Field(
        0.05, description="annotator's extra preference per word of length (gold price: 0.02)"
    )
    skills: list[str] = Field(default_factory=lambda: list(SKILLS), description="skills to use")

    @field_validator("skills")
    @classmethod
    def _known_skills(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SKILLS]
        if bad or not v:
            raise ValueError(f"unknown skills {bad}; valid skills: {', '.join(SKILLS)}")
        return v


def make_data(cfg: MakeDataConfig) -> dict[str, Path]:
    """Write the five JSONL files and ``stats.json`` into ``cfg.out``; returns name -> path."""
    out = Path(cfg.out)
    names = ("prompts_train", "prompts_eval", "sft", "prefs_train", "prefs_test")
    seeds = {name: cfg.seed * 1000 + k for k, name in enumerate(names, start=1)}  # all distinct
    prefs_kw = {
        "temperature": cfg.annotator_temperature,
        "length_bias": cfg.length_bias,
        "skills": cfg.skills,
    }
    data = {
        "prompts_train": make_prompts(cfg.n_train_prompts, seeds["prompts_train"], cfg.skills),
        "prompts_eval": make_prompts(cfg.n_eval_prompts, seeds["prompts_eval"], cfg.skills),
        "sft": make_sft(
            cfg.n_sft, seeds["sft"], cfg.error_rate, cfg.filler_rate, skills=cfg.skills
        ),
        "prefs_train": make_preferences(cfg.n_prefs, seeds["prefs_train"], **prefs_kw),
        "prefs_test": make_preferences(cfg.n_prefs_test, seeds["prefs_test"], **prefs_kw),
    }
    paths = {}
    for name, records in data.items():
        paths[name] = out / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    paths["stats"] = out / "stats.json"
    stats = _stats(data, seeds)
    write_json(paths["stats"], stats)
    print(summary(paths, stats))
    return paths


def summary(paths: dict[str, Path], stats: dict[str, Any]) -> str:
    """What ``make_data`` wrote: one line per file with its record count and make-up."""
    n = stats["counts"]
    what = {
        "prompts_train": f"{n['prompts_train']} prompts (online generation)",
        "prompts_eval": f"{n['prompts_eval']} prompts (held out, gold evaluation)",
        "sft": f"{n['sft']} demonstrations, {stats['sft_error_rate']:.1%} with a wrong answer, "
               f"{stats['sft_filler_rate']:.1%} with filler",
    }
    for name in ("prefs_train", "prefs_test"):
        s = stats[name]
        subsets = ", ".join(f"{v} {k}" for k, v in sorted(s["subsets"].items()))
        what[name] = (f"{n[name]} pairs ({subsets}), chosen has the higher gold reward in "
                      f"{s['gold_agreement']:.1%}")
    what["stats"] = "counts, seeds and rates"
    width = max(len(p.name) for p in paths.values())
    lines = [f"sandbox data -> {paths['stats'].parent}"]
    lines += [f"  {p.name:<{width}}  {what[name]}" for name, p in paths.items()]
    return "\n".join(lines)


def _stats(data: dict[str, list[dict]], seeds: dict[str, int]) -> dict[str, Any]:
    sft = data["sft"]
    stats: dict[str, Any] = {
        "counts": {name: len(recs) for name, recs in data.items()},
        "seeds": seeds,
        "sft_error_rate": sum(not r["meta"]["demo_correct"] for r in sft) / max(1, len(sft)),
        "sft_filler_rate": sum(r["meta"]["n_fillers"] > 0 for r in sft) / max(1, len(sft)),
    }
    for name in ("prefs_train", "prefs_test"):
        recs = data[name]
        agree = sum(r["meta"]["gold_chosen"] > r["meta"]["gold_rejected"] for r in recs)
        stats[name] = {
            "subsets": dict(Counter(r["subset"] for r in recs)),
            "gold_agreement": agree / max(1, len(recs)),
        }
    return stats
