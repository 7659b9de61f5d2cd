"""``rlhf eval winrate``: a policy against a baseline on held-out prompts, judged by our own
judges, with a length-controlled win rate (the local counterpart of LC AlpacaEval 2).

Both policies sample the same prompts (``sampling.n`` each, the same seed); sample k of the
policy is compared with sample k of the baseline. The preference for the policy's response:

* a BT model or a DPO implicit judge: the BT probability ``sigmoid(r_policy - r_baseline)``;
* a preference model: its ``P(policy better)``, averaged over both orders of the pair;
* a reward function, the gold reward or a combination: 1 if it scores the policy's response
  higher, 0 if lower, 0.5 on a tie (a program's scores carry no probability).

The **win rate** is the mean preference. The **length-controlled win rate** is fitted as
AlpacaEval 2 does, without its per-instruction term: a logistic regression of the preference
on ``tanh(d / sd(d))``, ``d`` the policy's response length minus the baseline's in characters,
read at ``d = 0`` (``sigmoid`` of the intercept): what the judge would prefer if the two were
equally long. A judge that prefers only length gives 0.5 whatever the raw rate; a judge blind
to length gives the raw rate. Standard errors: bootstrap over prompts (all of a prompt's
sample pairs drawn together). Writes ``winrate.json`` and ``samples.jsonl`` (every pair with
its lengths and preference) in ``out``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from pydantic import Field

from ..config import Config, ModelConfig, save_config
from ..data.readers import read_records
from ..data.records import Prompt, Rollout
from ..distributed import device
from ..generation.hf import generate_hf
from ..generation.sampling import Sample, SamplingConfig
from ..io import write_json, write_jsonl
from ..models.loading import load_model, load_tokenizer
from ..online.annotate import AnnotatorConfig, make_scorer
from ..training.engine import free


class WinRateConfig(Config):
    policy: ModelConfig = ModelConfig(path="runs/online/iter_3/dpo/model")
    baseline: ModelConfig = ModelConfig(path="runs/sft/model")
    judge: AnnotatorConfig = Field(AnnotatorConfig(), description="the judge (annotator settings: kind, path, ...)")
    prompts: str = Field("runs/sandbox-data/prompts_eval.jsonl", description="held-out prompts")
    limit: int = Field(0, ge=0, description="only the first N prompts (0 = all)")
    sampling: SamplingConfig = SamplingConfig(n=1, temperature=1.0, max_new_tokens=512, batch_size=32)
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples of the prompts for the standard errors")
    seed: int = Field(0, description="sampling and bootstrap seed")
    out: str = Field("runs/eval_winrate", description="folder for winrate.json, samples.jsonl, config.yaml")


def run_eval_winrate(cfg: WinRateConfig) -> dict:
    prompts = read_records(cfg.prompts, Prompt)
    prompts = prompts[: cfg.limit] if cfg.limit else prompts
    messages = [p.messages() for p in prompts]
    sampling = cfg.sampling.model_copy(update={"seed": cfg.seed})
    samples = {}
    for side, spec in (("policy", cfg.policy), ("baseline", cfg.baseline)):
        model = load_model(spec).to(device())
        samples[side] = generate_hf(model, load_tokenizer(spec), messages, sampling)
        free(model)
    prefs = preferences(cfg.judge, prompts, samples["policy"], samples["baseline"])
    length = length_differences(samples["policy"], samples["baseline"])
    result = {"policy": cfg.policy.path, "baseline": cfg.baseline.path, "judge": cfg.judge.kind,
              "prompts": len(prompts), "samples_per_prompt": sampling.n,
              **win_rates(prefs, length, cfg.bootstrap, cfg.seed)}
    out = Path(cfg.out)
    write_jsonl(out / "samples.jsonl", (
        {"id": p.id, "sample": k, "policy": a.text, "baseline": b.text, "length_difference": d, "preference": x}
        for p, pa, pb, ds, xs in zip(prompts, samples["policy"], samples["baseline"], length, prefs, strict=True)
        for k, (a, b, d, x) in enumerate(zip(pa, pb, ds, xs, strict=True))))
    write_json(out / "winrate.json", result)
    save_config(cfg, out / "config.yaml")
    print(f"eval winrate: {cfg.policy.path} against {cfg.baseline.path}, judge {cfg.judge.kind}, "
          f"{len(prompts)} prompts x {sampling.n}: win rate {result['win_rate']:.3f} +- {result['win_rate_se']:.3f}, "
          f"length-controlled {result['lc_win_rate']:.3f} +- {result['lc_win_rate_se']:.3f} -> {out}")
    return result


def preferences(judge: AnnotatorConfig, prompts: list[Prompt], policy: list[list[Sample]],
                baseline: list[list[Sample]]) -> list[list[float]]:
    """The judge's preference for the policy's sample k over the baseline's, per prompt."""
    if judge.kind == "pm":
        from ..reward.pm import compare, load_preference_model

        model, tok = load_preference_model(judge.path, judge.dtype, device())
        items = [(p.messages(), a.text, b.text) for p, pa, pb in zip(prompts, policy, baseline, strict=True)
                 for a, b in zip(pa, pb, strict=True)]
        flat = iter(compare(model, tok, items, judge.batch_size, judge.max_length).probs)
        free(model)
        return [[next(flat) for _ in pa] for pa in policy]

    scorer = make_scorer(judge)
    return reward_preferences(judge.kind, scorer(as_rollouts(prompts, policy)), scorer(as_rollouts(prompts, baseline)))


def reward_preferences(kind: str, policy: list[list[float]], baseline: list[list[float]]) -> list[list[float]]:
    """The preference for each policy sample from the two samples' rewards under a judge of
    ``kind``: sigmoid of the difference for a reward model (bt, dpo), else 1 / 0.5 / 0."""
    def prefer(a: float, b: float) -> float:
        if kind in ("bt", "dpo"):
            return 0.5 + 0.5 * math.tanh((a - b) / 2)  # (sigmoid(a - b), without overflow)
        return 0.5 + 0.5 * ((a > b) - (a < b))

    return [[prefer(a, b) for a, b in zip(xa, xb, strict=True)] for xa, xb in zip(policy, baseline, strict=True)]


def judge_identity(judge: AnnotatorConfig) -> str:
    """A digest of a judge's settings: rewards stored under the same one are comparable."""
    return hashlib.sha256(judge.model_dump_json().encode()).hexdigest()[:16]


def as_rollouts(prompts: list[Prompt], groups: list[list[Sample]]) -> list[Rollout]:
    """Each prompt with its samples, as a judge scores them."""
    return [Rollout(prompt=p.prompt, id=p.id, meta=p.meta, responses=[s.text for s in g],
                    finish_reasons=[s.finish_reason for s in g]) for p, g in zip(prompts, groups, strict=True)]


def length_differences(policy: list[list[Sample]], baseline: list[list[Sample]]) -> list[list[int]]:
    """Characters of the policy's sample k minus the baseline's, per prompt."""
    return [[len(a.text) - len(b.text) for a, b in zip(pa, pb, strict=True)]
            for pa, pb in zip(policy, baseline, strict=True)]


def lc_win_rate(prefs: list[float], length: list[float], ridge: float = 1e-7, steps: int = 100) -> float:
    """``sigmoid(a)`` of the logistic fit ``pref ~ sigmoid(a + b tanh(d / sd(d)))`` (Newton's
    method on the log-likelihood with soft targets; a small ridge on ``b`` keeps it finite when
    the length separates the preferences)."""
    y = torch.tensor(prefs, dtype=torch.float64)
    d = torch.tensor(length, dtype=torch.float64)
    sd = d.std() if len(d) > 1 else torch.tensor(0.0, dtype=torch.float64)
    x = torch.tanh(d / sd) if sd > 0 else torch.zeros_like(d)
    X = torch.stack([torch.ones_like(x), x], 1)
    w = torch.zeros(2, dtype=torch.float64)
    penalty = torch.diag(torch.tensor([0.0, ridge], dtype=torch.float64)) * len(y)
    for _ in range(steps):
        p = torch.sigmoid(X @ w)
        grad = X.T @ (y - p) - penalty @ w
        hess = X.T @ (X * (p * (1 - p)).unsqueeze(1)) + penalty + 1e-12 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        w = w + step
        if step.abs().max() < 1e-10:
            break
    return float(torch.sigmoid(w[0]))


def win_rates(prefs: list[list[float]], length: list[list[float]], bootstrap: int, seed: int) -> dict:
    """Raw and length-controlled win rates with bootstrap standard errors over prompts."""
    def both(idx: list[int]) -> tuple[float, float]:
        ys = [y for i in idx for y in prefs[i]]
        ds = [d for i in idx for d in length[i]]
        return sum(ys) / len(ys), lc_win_rate(ys, ds)

    raw, lc = both(list(range(len(prefs))))
    g = torch.Generator().manual_seed(seed)
    draws = [both(torch.randint(len(prefs), (len(prefs),), generator=g).tolist()) for _ in range(bootstrap)]

    def sd(xs: list[float]) -> float:
        return float(torch.tensor(xs, dtype=torch.float64).std()) if len(xs) > 1 else float("nan")

    flat = [d for ds in length for d in ds]
    return {"win_rate": raw, "win_rate_se": sd([r for r, _ in draws]), "lc_win_rate": lc,
            "lc_win_rate_se": sd([c for _, c in draws]), "mean_length_difference": sum(flat) / len(flat)}
