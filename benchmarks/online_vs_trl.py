"""`rlhf loop` versus TRL's OnlineDPOTrainer on the sandbox: gold reward for the same samples, and time to it.

    python benchmarks/online_vs_trl.py [--seeds 0,1,2] [--judges gold,dpo] [--root runs/bench-online]
    python benchmarks/online_vs_trl.py --iterations 12   # then: ours in 12 smaller iterations, the same samples

Per seed, the default demo's set-up (``rlhf demo``'s stages: sandbox data, tiny policy, SFT, and
the DPO judge its headline loop uses). Then, per judge (``gold``: the sandbox gold reward, an
oracle; ``dpo``: the demo's DPO implicit judge), the same SFT policy is trained online by both:

* ours: the demo's loop, 3 iterations x 200 prompts x n = 8 samples (4,800 in all), max-min
  pairs, 2 DPO epochs an iteration at lr 1e-4, beta 0.1, 16 pairs a step, reference = SFT;
* TRL: ``OnlineDPOTrainer`` on the same 600 prompts the loop drew (its three slices) for 4
  epochs, 2 samples a prompt (TRL's fixed n), 16 prompts a step: 4,800 samples too; the same
  lr with a cosine schedule and 3% warm-up, beta 0.1, sampling (temperature 1, no top-k / top-p,
  48 new tokens), AdamW (0.9, 0.95), clipping at 1, fp32, the SFT model as its reference; the
  judge's scores through this project's scorer (the same numbers for the same response), the
  gold reward charging a response cut at 48 tokens the same price as ours.

Both are scored by this project's held-out evaluation (the demo's 1,700 prompts x 4 samples,
the same sampling seed): ours after each iteration, TRL at each of its checkpoints after 1,600,
3,200 and 4,800 samples. *Training seconds*: ours, the loop's stages (prompts, generate,
annotate, pairs, DPO, each a process of its own with its model loads) from ``state.json``,
without the held-out evaluation; TRL, from building the trainer (its model loads) to each
checkpoint, without the time spent saving checkpoints. The gold target of a (seed, judge) is
set from both runs alike: half way from SFT to the lower of the two final gold rewards
(docs/preregistration.md); the time to it is that of the first checkpoint at or above it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from dpo_vs_trl import run_worker

SAMPLES_PER_CHECKPOINT = 1600  # one iteration of ours: 200 prompts x 8


def _demo(root: Path, seed: int):
    from rlhf_workflow.demo import DemoConfig, _stage, _with_paths
    from rlhf_workflow.models.tiny import init_model
    from rlhf_workflow.sandbox import make_data
    from rlhf_workflow.training.dpo import run_dpo
    from rlhf_workflow.training.sft import run_sft

    out = root / f"seed_{seed}"
    cfg = _with_paths(DemoConfig(out=str(out), seed=seed), out)
    _stage("sandbox data", out / "data" / "stats.json", make_data, cfg.data)
    _stage("tiny model", out / "init" / "config.json", init_model, cfg.model)
    _stage("SFT", out / "sft" / "model" / "config.json", run_sft, cfg.sft)
    _stage("DPO judge", out / "dpo_judge" / "model" / "config.json", run_dpo, cfg.dpo_judge)
    return cfg


def _loop_config(root: Path, seed: int, judge: str, iterations: int = 3):
    cfg = _demo(root, seed).online.model_copy(deep=True)
    cfg.out = str(root / f"seed_{seed}" / f"ours_{judge}")
    if iterations != cfg.iterations:  # the same 600 prompts in smaller slices, evaluated after each third
        cfg.prompts.per_iteration = cfg.iterations * cfg.prompts.per_iteration // iterations
        cfg.iterations, cfg.eval.every, cfg.out = iterations, iterations // 3, f"{cfg.out}_{iterations}"
    if judge == "gold":
        cfg.annotate.annotator = cfg.annotate.annotator.model_copy(update={"kind": "gold", "reference": None})
    return cfg


def ours(root: Path, seed: int, judge: str, iterations: int = 3) -> dict:
    from rlhf_workflow.online.loop import run_loop

    cfg = _loop_config(root, seed, judge, iterations)
    run_loop(cfg)
    seconds = json.loads((Path(cfg.out) / "state.json").read_text())["completed"]
    train, points = 0.0, []
    for t in range(1, cfg.iterations + 1):
        train += sum(v for k, v in seconds.items() if k.startswith(f"iter_{t}/") and not k.endswith("/eval"))
        if t % cfg.eval.every:
            continue
        m = json.loads((Path(cfg.out) / f"iter_{t}" / "metrics.json").read_text())
        points.append({"samples": t * cfg.prompts.per_iteration * cfg.generate.sampling.n, "train_s": train,
                       "gold": m["gold_reward"], "gold_vs_sft": m["gold_vs_baseline"],
                       "se": m["gold_vs_baseline_se"], "kl": m.get("kl")})
    sft = json.loads((Path(cfg.out) / "iter_0" / "metrics.json").read_text())["gold_reward"]
    return {"sft_gold": sft, "points": points}


def trl_worker(root: Path, seed: int, judge: str) -> dict:
    """TRL's side, in a process of its own (its peak memory its own)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from rlhf_workflow.data.readers import read_records
    from rlhf_workflow.data.records import Prompt, Rollout
    from rlhf_workflow.online.annotate import make_scorer

    cfg = _loop_config(root, seed, judge)
    sft, out = cfg.policy.path, Path(cfg.out).with_name(f"trl_{judge}")
    prompts = [p for t in range(1, cfg.iterations + 1) for p in read_records(Path(cfg.out) / f"iter_{t}" / "prompts.jsonl", Prompt)]
    data = Dataset.from_list([{"prompt": p.messages(), "meta_json": json.dumps(p.meta)} for p in prompts])
    sampling, dpo = cfg.generate.sampling, cfg.dpo
    per_step = dpo.train.global_batch_size
    epochs = sampling.n // 2  # 2 samples a prompt: as many samples from the same prompts as the loop
    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(sft)
    scorer = make_scorer(cfg.annotate.annotator)
    eos = tok.eos_token_id

    def judge_reward(prompts, completions, completion_ids, meta_json, **_):
        rollouts = [Rollout(prompt=p, responses=[c[0]["content"]], meta=json.loads(m),
                            finish_reasons=["stop" if eos in ids else "length"])
                    for p, c, ids, m in zip(prompts, completions, completion_ids, meta_json, strict=True)]
        return [r[0] for r in scorer(rollouts)]

    saving = {"s": 0.0, "t": 0.0}
    points = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            saving["t"] = time.perf_counter()
            if state.global_step % (SAMPLES_PER_CHECKPOINT // (2 * per_step)) == 0:
                points.append({"samples": state.global_step * 2 * per_step,
                               "train_s": saving["t"] - t_start - saving["s"],
                               "checkpoint": str(out / f"checkpoint-{state.global_step}")})

        def on_save(self, args, state, control, **kw):
            saving["s"] += time.perf_counter() - saving["t"]

    args = OnlineDPOConfig(
        output_dir=str(out), per_device_train_batch_size=per_step, gradient_accumulation_steps=1,
        num_train_epochs=epochs, learning_rate=dpo.optim.lr, lr_scheduler_type="cosine",
        warmup_steps=dpo.optim.warmup_ratio, adam_beta1=dpo.optim.betas[0], adam_beta2=dpo.optim.betas[1],
        weight_decay=dpo.optim.weight_decay, max_grad_norm=dpo.optim.max_grad_norm, beta=[dpo.loss.beta],
        loss_type="sigmoid", max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
        top_p=1.0, top_k=0, max_length=dpo.data.max_length + sampling.max_new_tokens,
        save_strategy="steps", save_steps=SAMPLES_PER_CHECKPOINT // (2 * per_step), save_only_model=True,
        logging_steps=10, report_to="none", disable_tqdm=True, seed=seed, bf16=False, use_cpu=True,
        dataloader_num_workers=0, gradient_checkpointing=False,  # (TRL recomputes by default; ours does not)
    )
    torch.manual_seed(seed)
    trainer = OnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(sft), ref_model=AutoModelForCausalLM.from_pretrained(sft),
        reward_funcs=judge_reward, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()])
    trainer.train()
    return {"points": points, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def trl(root: Path, seed: int, judge: str) -> dict:
    from rlhf_workflow.evaluation.iteration import IterationEvalConfig, run_iteration_eval

    res = run_worker(__file__, "--worker", "--root", str(root), "--seeds", str(seed), "--judges", judge)
    cfg = _loop_config(root, seed, judge)
    for t, p in enumerate(res["points"], 1):
        m = run_iteration_eval(IterationEvalConfig(
            iteration=t, policy=cfg.policy.model_copy(update={"path": p["checkpoint"]}), sft=cfg.policy.path,
            eval=cfg.eval, annotator=cfg.annotate.annotator, seed=cfg.seed,
            baseline=str(Path(cfg.out) / "iter_0" / "eval_gold.jsonl"), out=str(Path(p["checkpoint"]) / "metrics.json")))
        p.update(gold=m["gold_reward"], gold_vs_sft=m["gold_vs_baseline"], se=m["gold_vs_baseline_se"], kl=m.get("kl"))
    return res


def time_to(points: list[dict], target: float) -> float | None:
    return next((p["train_s"] for p in points if p["gold"] >= target), None)


def compare(o: dict, t: dict) -> dict:
    sft = o["sft_gold"]
    final = min(o["points"][-1]["gold"], t["points"][-1]["gold"])
    target = sft + (final - sft) / 2 if final > sft else None
    res = {"sft_gold": sft, "target": target,
           "final_gold": {"ours": o["points"][-1]["gold"], "trl": t["points"][-1]["gold"]},
           "train_s": {"ours": o["points"][-1]["train_s"], "trl": t["points"][-1]["train_s"]},
           "trl_peak_rss_mb": t["peak_rss_mb"]}
    if target is not None:
        res["time_to_target"] = {"ours": time_to(o["points"], target), "trl": time_to(t["points"], target)}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--judges", default="gold,dpo")
    p.add_argument("--root", default="runs/bench-online")
    p.add_argument("--iterations", type=int, default=3, help="our loop's iterations over the same 600 prompts "
                   "(evaluated after each third); other than 3: ours only, against the TRL runs in --root")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    root, seeds, judges = Path(args.root), [int(s) for s in args.seeds.split(",")], args.judges.split(",")
    if args.worker:
        print("RESULT " + json.dumps(trl_worker(root, seeds[0], judges[0])))
        return
    k = args.iterations
    results, name = {}, "results.json" if k == 3 else f"results_{k}.json"
    for seed in seeds:
        for judge in judges:
            o = ours(root, seed, judge, k)
            t = trl(root, seed, judge) if k == 3 else \
                json.loads((root / "results.json").read_text())[f"seed_{seed}/{judge}"]["trl"]
            results[f"seed_{seed}/{judge}"] = {"ours": o, "trl": t, **compare(o, t)}
            (root / name).write_text(json.dumps(results, indent=1))
            r = results[f"seed_{seed}/{judge}"]
            print(f"seed {seed} judge {judge}: SFT {r['sft_gold']:.3f}; final gold ours {r['final_gold']['ours']:.3f} "
                  f"TRL {r['final_gold']['trl']:.3f}; training s ours {r['train_s']['ours']:.0f} "
                  f"TRL {r['train_s']['trl']:.0f}; to target {r.get('time_to_target')}", flush=True)
    print(json.dumps({k: {x: v[x] for x in ("final_gold", "train_s", "time_to_target") if x in v}
                      for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
