"""Evaluation of each policy of the online loop.

On held-out prompts (``eval.prompts``), with the same sampling seed for every policy:
mean reward under the annotating reward model, mean length, end-of-turn rate, the gold
reward when the prompts carry sandbox ``meta``, and a Monte-Carlo estimate of
KL(pi_t || pi_0) = E_{y ~ pi_t}[log pi_t(y|x) - log pi_0(y|x)] from the same samples (exact in
expectation at temperature 1 without top-k/top-p). From the iteration's own scored rollouts
(samples of pi_{t-1}): their mean and best-of-n reward, how many pairs were kept, and on
sandbox prompts the winner's curse of selection: the gold reward of the response the judge
chose against the best gold reward among the n (and of the one it rejected).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..data.batching import collate_rows
from ..data.chat import IGNORE, encode_prompt
from ..data.readers import iter_records, iter_rows, read_records
from ..data.records import Prompt, Rollout
from ..distributed import device, run_batched, to_device
from ..generation.hf import generate_hf
from ..generation.sampling import Sample, SamplingConfig
from ..models.loading import load_model, load_tokenizer, pad_id
from ..models.logprobs import response_logps
from ..online.annotate import gold_rewards
from .policy import gold_metrics


def sample_logps(model, tokenizer, prompts: list[list[dict]], samples: list[Sample],
                 batch_size: int = 16) -> list[float]:
    """log pi(y | x) of each sample's own token ids (exactly what was sampled, no re-tokenizing),
    summed over the response; each distinct prompt is tokenized once."""
    model.eval()
    encoded: dict[int, list[int]] = {}
    seqs = []
    for p, s in zip(prompts, samples, strict=True):
        prompt = encoded.setdefault(id(p), encode_prompt(tokenizer, p))
        seqs.append((prompt + list(s.token_ids), [IGNORE] * (len(prompt) - 1) + list(s.token_ids) + [IGNORE]))
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device

    def run(idx: list[int]) -> torch.Tensor:
        return response_logps(model, to_device(collate_rows([[seqs[i]] for i in idx], pad), device))

    return run_batched([len(ids) for ids, _ in seqs], batch_size, run, shard=False).tolist()


def evaluate_iteration(policy: str, sft: str, model_cfg: ModelConfig, eval_cfg, annotator,
                       seed: int, iteration_dir: Path | None) -> dict:
    metrics: dict = {}
    if iteration_dir is not None:
        metrics.update(_rollout_stats(iteration_dir))
    if eval_cfg.prompts:
        metrics.update(_held_out(policy, sft, model_cfg, eval_cfg, annotator, seed))
    return metrics


def _rollout_stats(d: Path) -> dict:
    """Streams the scored rollouts, keeping rewards (and, on sandbox prompts, gold rewards) only."""
    rewards: list[list[float]] = []
    gold: dict[str | None, list[float]] | None = {}
    for ro in iter_records(d / "scored.jsonl", Rollout):
        rewards.append(ro.rewards)
        if gold is not None and ro.meta and "answer" in ro.meta:
            gold[ro.id] = gold_rewards([ro])[0]
        else:
            gold = None  # not every prompt is a sandbox prompt: no gold
    flat = [r for rs in rewards for r in rs]
    stats = json.loads((d / "pairs.stats.json").read_text())
    out = {"rollout_rm_reward": sum(flat) / len(flat),
           "rollout_best_of_n": sum(max(rs) for rs in rewards) / len(rewards),
           "pairs": stats["pairs"], "dropped_ties": stats["dropped_ties"]}
    if gold:
        out.update(selection_gold(gold, iter_rows(d / "pairs.jsonl")))
    return out


def selection_gold(gold: dict, pairs) -> dict:
    """Over the prompts that gave a pair (``gold``: rollout id -> gold reward of each response):
    mean gold reward of the judge's chosen and rejected responses, of the best and of all n
    responses. ``best - chosen`` is the winner's curse: what selecting by the judge loses
    against selecting by gold."""
    rows = [(gold[p["id"]], p["meta"]["chosen_index"], p["meta"]["rejected_index"]) for _, p in pairs]
    if not rows:
        return {}
    return {"chosen_gold": _mean(g[c] for g, c, _ in rows), "rejected_gold": _mean(g[r] for g, _, r in rows),
            "best_gold": _mean(max(g) for g, _, _ in rows), "rollout_gold": _mean(sum(g) / len(g) for g, _, _ in rows)}


def _held_out(policy: str, sft: str, model_cfg: ModelConfig, eval_cfg, annotator, seed: int) -> dict:
    prompts = read_records(eval_cfg.prompts, Prompt)
    prompts = prompts[: eval_cfg.limit] if eval_cfg.limit else prompts
    messages = [p.messages() for p in prompts]
    sampling: SamplingConfig = eval_cfg.sampling.model_copy(update={"seed": seed})
    spec = model_cfg.model_copy(update={"path": policy})
    model, tok = _load_on_device(spec)
    samples = generate_hf(model, tok, messages, sampling)
    flat_p = [m for m, group in zip(messages, samples, strict=True) for _ in group]
    flat_s = [s for group in samples for s in group]
    flat_r = [s.text for s in flat_s]
    out = {"mean_tokens": _mean([s.num_tokens for g in samples for s in g]),
           "mean_chars": _mean([len(t) for t in flat_r]),
           "eos_rate": _mean([s.finish_reason == "stop" for g in samples for s in g])}
    if eval_cfg.kl:
        lp = sample_logps(model, tok, flat_p, flat_s)
        del model
        ref, _ = _load_on_device(spec.model_copy(update={"path": sft}))
        out["kl"] = _mean([a - b for a, b in zip(lp, sample_logps(ref, tok, flat_p, flat_s), strict=True)])
        del ref
    else:
        del model
    gc.collect()
    if annotator.kind in ("bt", "dpo"):  # (a PM gives no absolute reward; gold is reported below)
        from ..reward.bt import load_reward_model, score

        rm, rm_tok = load_reward_model(annotator.path, annotator.dtype, reference=annotator.reference,
                                       beta=annotator.beta)
        rewards = score(rm, rm_tok, flat_p, flat_r, annotator.batch_size, annotator.max_length, progress=False)
        per_prompt = [rewards[i : i + sampling.n] for i in range(0, len(rewards), sampling.n)]
        out.update(rm_reward=_mean(rewards), rm_best_of_n=_mean([max(g) for g in per_prompt]))
        del rm
        gc.collect()
    if all(p.meta and "skill" in p.meta for p in prompts):
        gold = gold_metrics(prompts, samples)
        out.update(gold_reward=gold["gold_reward"], accuracy=gold["accuracy"], per_skill=gold["per_skill"])
    return out


def _load_on_device(spec: ModelConfig):
    return load_model(spec).to(device()), load_tokenizer(spec)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
