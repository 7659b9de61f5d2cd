"""Evaluation of each policy of the online loop: ``rlhf eval iteration``, a stage of its own.

The loop launches it like generation and annotation (on ``processes`` ranks, in a process of
its own, so its memory is returned before the next stage starts); on several ranks each holds
a copy of the policy, the reference and the judge in turn, and the sampling, the log-probs and
the scoring are shared out over them (same numbers as one process). With the vLLM backend the
loop samples the held-out prompts with ``rlhf generate`` first (token ids kept) and this stage
reads those samples (``rollouts``).

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

import json
from pathlib import Path

import torch
from pydantic import Field

from ..config import Config, ModelConfig
from ..data.batching import collate_rows
from ..data.chat import IGNORE, encode_prompt
from ..data.readers import iter_records, iter_rows, read_records
from ..data.records import Prompt, Rollout
from ..distributed import rank_and_world, run_batched, setup, to_device
from ..faults import point
from ..generation.hf import generate_hf
from ..generation.sampling import Sample, SamplingConfig
from ..io import write_json, write_jsonl
from ..models.loading import load_tokenizer, pad_id
from ..models.logprobs import response_logps
from ..online.annotate import AnnotatorConfig
from ..sandbox.rewards import gold_rewards
from ..training.engine import free, load_frozen
from .policy import gold_by_prompt, gold_metrics, paired_difference


class HeldOutConfig(Config):
    prompts: str | None = Field(None, description="held-out prompts to evaluate each policy on (None = skip)")
    limit: int = Field(500, ge=0, description="evaluate on the first N held-out prompts (0 = all)")
    sampling: SamplingConfig = SamplingConfig(n=4, temperature=1.0, max_new_tokens=2048)
    kl: bool = Field(True, description="estimate KL(pi_t || pi_0) from the sampled responses")
    every: int = Field(1, ge=1, description="rlhf loop: evaluate on the held-out prompts every k-th iteration "
                       "(the SFT policy and the last iteration always); the others report their own rollouts only")
    winrate: bool = Field(False, description="each policy's win rate against the SFT policy's held-out samples, "
                          "judged by the annotator: raw and length-controlled, with bootstrap standard errors "
                          "(as `rlhf eval winrate`)")


class IterationEvalConfig(Config):
    iteration: int = Field(0, ge=0, description="the iteration (0 = the SFT policy)")
    policy: ModelConfig = ModelConfig(path="runs/online/iter_1/dpo/model")
    sft: str = Field("runs/sft/model", description="pi_0, for the KL estimate")
    eval: HeldOutConfig = HeldOutConfig()
    annotator: AnnotatorConfig = AnnotatorConfig()
    seed: int = Field(42, description="sampling seed (the same for every policy)")
    rollouts: str | None = Field(
        None, description="held-out samples to evaluate (`rlhf generate` output with token ids, e.g. from vLLM) "
        "instead of sampling here with transformers")
    iteration_dir: str | None = Field(
        None, description="the iteration's folder (scored rollouts and pairs) for its rollout statistics")
    gold_out: str | None = Field(
        None, description="JSONL file for each held-out prompt's gold rewards (id, one per sample), for pairing")
    baseline: str | None = Field(
        None, description="another policy's gold_out file (e.g. the SFT policy's): the gold reward's difference "
        "to it, paired by prompt, with its standard error")
    samples_out: str | None = Field(None, description="JSONL file for the held-out responses and, from a judge "
                                    "with a reward per sample, their rewards (the SFT policy's: "
                                    "the win rate's baseline)")
    baseline_samples: str | None = Field(None, description="another policy's samples_out file: the win rate "
                                         "against it (with eval.winrate)")
    out: str = Field("metrics.json", description="JSON file to write")


def run_iteration_eval(cfg: IterationEvalConfig) -> dict:
    """Evaluate one policy of the loop and write ``cfg.out`` (on the main process)."""
    rank, world, _ = setup()
    if rank == 0 and cfg.eval.prompts:
        print(f"eval iteration {cfg.iteration}: {cfg.policy.path} on held-out prompts ({cfg.eval.sampling.n} "
              f"samples each), on {world} process(es)")
    metrics = evaluate_iteration(cfg.policy.path, cfg.sft, cfg.policy, cfg.eval, cfg.annotator, cfg.seed,
                                 Path(cfg.iteration_dir) if cfg.iteration_dir else None, cfg.rollouts,
                                 (cfg.gold_out, cfg.baseline), (cfg.samples_out, cfg.baseline_samples))
    result = {"iteration": cfg.iteration, "policy": cfg.policy.path, "processes": world, **metrics}
    point("eval")
    if rank == 0:
        write_json(cfg.out, result)
    return result


def sample_logps(model, tokenizer, prompts: list[list[dict]], samples: list[Sample],
                 batch_size: int = 16, shard: bool = False) -> list[float]:
    """log pi(y | x) of each sample's own token ids (exactly what was sampled, no re-tokenizing),
    summed over the response; each distinct prompt is tokenized once. With ``shard`` the batches
    are shared out over the ranks (each holding the model)."""
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

    return run_batched([len(ids) for ids, _ in seqs], batch_size, run, shard=shard).tolist()


def evaluate_iteration(policy: str, sft: str, model_cfg: ModelConfig, eval_cfg: HeldOutConfig, annotator,
                       seed: int, iteration_dir: Path | None, rollouts: str | None = None,
                       paired: tuple[str | None, str | None] = (None, None),
                       against: tuple[str | None, str | None] = (None, None)) -> dict:
    """``paired``: (a file to write each held-out prompt's gold rewards to, another policy's such
    file to compare with); ``against``: the same for the samples themselves (the win rate)."""
    metrics: dict = {}
    if iteration_dir is not None:
        metrics.update(_rollout_stats(iteration_dir))
    if eval_cfg.prompts:
        metrics.update(_held_out(policy, sft, model_cfg, eval_cfg, annotator, seed, rollouts, paired, against))
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


def _held_out(policy: str, sft: str, model_cfg: ModelConfig, eval_cfg: HeldOutConfig, annotator, seed: int,
              rollouts: str | None, paired: tuple[str | None, str | None],
              against: tuple[str | None, str | None] = (None, None)) -> dict:
    prompts = read_records(eval_cfg.prompts, Prompt)
    prompts = prompts[: eval_cfg.limit] if eval_cfg.limit else prompts
    messages = [p.messages() for p in prompts]
    sampling: SamplingConfig = eval_cfg.sampling.model_copy(update={"seed": seed})
    spec = model_cfg.model_copy(update={"path": policy})
    tok = load_tokenizer(spec)
    shard = rank_and_world()[1] > 1  # every rank a copy: the work shared out, the numbers one process's
    model = None
    if rollouts is not None:
        samples = _read_samples(rollouts, prompts)
    else:
        model, _ = load_frozen(spec, shard=False)
        samples = generate_hf(model, tok, messages, sampling, shard=shard)
    flat_p = [m for m, group in zip(messages, samples, strict=True) for _ in group]
    flat_s = [s for group in samples for s in group]
    flat_r = [s.text for s in flat_s]
    out = {"mean_tokens": _mean([s.num_tokens for g in samples for s in g]),
           "mean_chars": _mean([len(t) for t in flat_r]),
           "eos_rate": _mean([s.finish_reason == "stop" for g in samples for s in g])}
    if eval_cfg.kl:
        if model is None:
            model, _ = load_frozen(spec, shard=False)
        lp = sample_logps(model, tok, flat_p, flat_s, shard=shard)
        free(model)
        ref, _ = load_frozen(spec.model_copy(update={"path": sft}), shard=False)
        out["kl"] = _mean([a - b for a, b in zip(lp, sample_logps(ref, tok, flat_p, flat_s, shard=shard),
                                                 strict=True)])
        free(ref)
    elif model is not None:
        free(model)
    if annotator.kind in ("bt", "dpo"):  # (a PM gives no absolute reward; gold is reported below)
        from ..reward.bt import load_reward_model, score

        rm, rm_tok = load_reward_model(annotator.path, annotator.dtype, reference=annotator.reference,
                                       beta=annotator.beta, shard=annotator.shard)
        rewards = score(rm, rm_tok, flat_p, flat_r, annotator.batch_size, annotator.max_length, progress=False,
                        shard=shard)
        per_prompt = [rewards[i : i + sampling.n] for i in range(0, len(rewards), sampling.n)]
        free(rm)
    elif annotator.kind == "function":
        from ..reward.functions import function_scorer
        from .winrate import as_rollouts

        per_prompt = function_scorer(annotator.function)(as_rollouts(prompts, samples))
    else:  # (a PM, gold or a combination: scored in the win rate, if asked)
        per_prompt = None
    if per_prompt is not None:
        out.update(rm_reward=_mean([r for g in per_prompt for r in g]), rm_best_of_n=_mean([max(g) for g in per_prompt]))
    out.update(_win_rate(prompts, samples, per_prompt, annotator, eval_cfg, seed, *against))
    if all(p.meta and "skill" in p.meta for p in prompts):
        gold = gold_metrics(prompts, samples)
        out.update(gold_reward=gold["gold_reward"], gold_reward_se=gold["gold_reward_se"], accuracy=gold["accuracy"],
                   per_skill=gold["per_skill"])
        out.update(_paired(prompts, gold_by_prompt(prompts, samples), *paired))
    return out


def _paired(prompts: list[Prompt], golds: list[list[float]], gold_out: str | None, baseline: str | None) -> dict:
    """Write each prompt's gold rewards to ``gold_out``; the paired difference to ``baseline``'s."""
    from ..errors import UserError

    if gold_out and rank_and_world()[0] == 0:
        write_jsonl(gold_out, ({"id": p.id, "gold": g} for p, g in zip(prompts, golds, strict=True)))
    if not baseline:
        return {}
    rows = [row for _, row in iter_rows(baseline)]
    if [r["id"] for r in rows] != [p.id for p in prompts]:
        raise UserError(f"{baseline}: the gold rewards of other prompts than these {len(prompts)} held-out ones")
    d = paired_difference(golds, [r["gold"] for r in rows])
    return {"gold_vs_baseline": d["diff"], "gold_vs_baseline_se": d["se"]}


def _win_rate(prompts: list[Prompt], samples: list[list[Sample]], rewards: list[list[float]] | None, annotator,
              eval_cfg: HeldOutConfig, seed: int, samples_out: str | None, baseline: str | None) -> dict:
    """Write the samples' texts to ``samples_out``, with the judge's ``rewards`` where it gives
    one per sample; with ``eval.winrate``, the win rate against ``baseline``'s (the SFT
    policy's), judged by the annotator: from the stored rewards where both files hold the same
    judge's, else by scoring both sides."""
    from ..errors import UserError
    from . import winrate

    judge = winrate.judge_identity(annotator)
    if samples_out and rank_and_world()[0] == 0:
        write_jsonl(samples_out, ({"id": p.id, "responses": [s.text for s in g],
                                   "finish_reasons": [s.finish_reason for s in g],
                                   **({"rewards": rewards[i], "judge": judge} if rewards is not None else {})}
                                  for i, (p, g) in enumerate(zip(prompts, samples, strict=True))))
    if not (eval_cfg.winrate and baseline):
        return {}
    rows = [row for _, row in iter_rows(baseline)]
    if [r["id"] for r in rows] != [p.id for p in prompts]:
        raise UserError(f"{baseline}: the samples of other prompts than these {len(prompts)} held-out ones")
    base = [[Sample(t, why, 0) for t, why in zip(r["responses"], r["finish_reasons"], strict=True)] for r in rows]
    if rewards is not None and all(r.get("judge") == judge for r in rows):
        prefs = winrate.reward_preferences(annotator.kind, rewards, [r["rewards"] for r in rows])
    else:
        prefs = winrate.preferences(annotator, prompts, samples, base)
    r = winrate.win_rates(prefs, winrate.length_differences(samples, base), 1000, seed)
    return {"win_rate": r["win_rate"], "win_rate_se": r["win_rate_se"], "lc_win_rate": r["lc_win_rate"],
            "lc_win_rate_se": r["lc_win_rate_se"]}


def _read_samples(path: str, prompts: list[Prompt]) -> list[list[Sample]]:
    """The samples of ``rlhf generate`` for the held-out prompts, in their order (token ids kept)."""
    from ..errors import UserError

    records = list(iter_records(path, Rollout))
    if len(records) != len(prompts) or any(r.token_ids is None for r in records):
        raise UserError(f"{path}: expected the {len(prompts)} held-out prompts' samples with their token ids "
                        f"(generate keep_token_ids=true); found {len(records)} rollouts")
    if [r.id for r in records] != [p.id for p in prompts]:
        raise UserError(f"{path}: its samples are of other prompts than {len(prompts)} held-out ones (ids differ)")
    return [[Sample(text, why, n, tuple(ids)) for text, why, n, ids in zip(
        r.responses, r.finish_reasons, r.num_tokens, r.token_ids, strict=True)] for r in records]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
