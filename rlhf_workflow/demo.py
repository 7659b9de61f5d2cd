"""``rlhf demo``: the whole workflow on the built-in sandbox, on a laptop CPU, resumable.

1. sandbox data, a tokenizer and a tiny policy; 2. SFT; 3. a BT reward model and a
pairwise preference model trained from the SFT model on the (length-biased) sandbox
preference pairs, both evaluated per subset; 4. offline DPO from the SFT model on a fixed
set of annotator pairs as large as the online run labels in total; 5. online iterative DPO
(3 iterations, n = 8, max_min pairs, BT annotator, reference = SFT); 6. the same online run
with a length penalty, and with the gold reward as the judge (an oracle reference run that
separates the loop's behaviour from the reward model's errors); 7. gold evaluation of every policy on held-out prompts (the loop's
evaluation, one code path for all); 8. ``report.md``/``report.html`` with plots.

Every stage writes under ``out`` and is skipped when its output exists, so re-running the
command continues a half-finished demo. Paths inside the stage sections are set by the demo;
every other option can be overridden, e.g. ``rlhf demo online.dpo.optim.lr=1e-4``.
With ``seeds=[0,1,2]`` the demo runs once per seed (``out/seed_K``) and ``out/seeds.md``
gives the mean and spread of the headline numbers.
"""

from __future__ import annotations

import json
import statistics
import time
from itertools import islice
from pathlib import Path

from pydantic import Field

from .config import Config, ModelConfig, OptimConfig, TrainConfig, save_config
from .data.readers import iter_rows
from .evaluation.iteration import evaluate_iteration
from .evaluation.judges import PMEvalConfig, RMEvalConfig, run_pm_eval, run_rm_eval
from .generation.sampling import SamplingConfig
from .io import write_json, write_jsonl, write_text
from .models.tiny import InitModelConfig, init_model
from .online.annotate import AnnotateConfig, AnnotatorConfig
from .online.generate import GenerateConfig
from .online.loop import SET as BY_LOOP
from .online.loop import LoopConfig, LoopEvalConfig, PromptPoolConfig, run_loop
from .online.pairs import SelectConfig
from .report import ReportConfig, run_report
from .reward.bt import PairDataConfig, RMConfig, RMDataConfig, run_rm_train
from .reward.pm import PMConfig, run_pm_train
from .sandbox import MakeDataConfig, make_data
from .training.dpo import DPOConfig, DPODataConfig, LossConfig, ReferenceConfig, run_dpo
from .training.sft import SFTConfig, SFTDataConfig, run_sft

SET = "(set by the demo)"
_QUIET = {"progress": False}


def _train(**kw) -> TrainConfig:
    return TrainConfig(output_dir=SET, **{**_QUIET, **kw})


SANDBOX_SFT = SFTConfig(
    model=ModelConfig(path=SET), data=SFTDataConfig(train=SET, max_length=256),
    optim=OptimConfig(lr=3e-3, warmup_ratio=0.05),
    train=_train(epochs=10, global_batch_size=16, micro_batch_size=16, log_every=20),
)
SANDBOX_RM = RMConfig(
    model=ModelConfig(path=SET), data=RMDataConfig(train=SET, test=SET, max_length=256),
    optim=OptimConfig(lr=1e-3, warmup_ratio=0.03),
    train=_train(epochs=1, global_batch_size=16, micro_batch_size=16, eval_every=0),
)
SANDBOX_PM = PMConfig(
    model=ModelConfig(path=SET), data=PairDataConfig(train=SET, test=SET, max_length=512),
    optim=OptimConfig(lr=1e-3, warmup_ratio=0.03),
    train=_train(epochs=1, global_batch_size=16, micro_batch_size=16, eval_every=0),
)
SANDBOX_DPO = DPOConfig(  # the loop's DPO stage; its paths are the loop's (or, offline, the demo's)
    model=ModelConfig(path=BY_LOOP), reference=ReferenceConfig(path=BY_LOOP),
    data=DPODataConfig(train=BY_LOOP, max_length=256), loss=LossConfig(beta=0.1),
    optim=OptimConfig(lr=2e-5, warmup_ratio=0.03),
    train=TrainConfig(output_dir=BY_LOOP, **_QUIET, epochs=2, global_batch_size=16, micro_batch_size=16,
                      log_every=10, save_every=20),
)
SANDBOX_LOOP = LoopConfig(
    out=SET, iterations=3, policy=ModelConfig(path=SET), reference="sft",
    prompts=PromptPoolConfig(source=SET, per_iteration=200),
    generate=GenerateConfig(model=ModelConfig(path=BY_LOOP), input=BY_LOOP, out=BY_LOOP, chunk_size=100,
                            sampling=SamplingConfig(n=8, temperature=1.0, max_new_tokens=48, batch_size=50)),
    annotate=AnnotateConfig(input=BY_LOOP, out=BY_LOOP, annotator=AnnotatorConfig(path=SET, dtype="fp32", max_length=256)),
    select=SelectConfig(strategy="max_min"),
    dpo=SANDBOX_DPO,
    eval=LoopEvalConfig(prompts=SET, limit=0, sampling=SamplingConfig(n=4, temperature=1.0, max_new_tokens=48,
                                                                          batch_size=100)),
)


class DemoConfig(Config):
    out: str = Field("runs/demo", description="run directory of the demo")
    seed: int = Field(0, description="seed of the data, the model initialisation and training")
    seeds: list[int] | None = Field(None, description="run the demo once per seed and summarise mean/spread")
    data: MakeDataConfig = MakeDataConfig(n_prefs=20000)
    model: InitModelConfig = InitModelConfig()
    sft: SFTConfig = SANDBOX_SFT
    rm: RMConfig = SANDBOX_RM
    pm: PMConfig = SANDBOX_PM
    online: LoopConfig = SANDBOX_LOOP
    length_penalty: float = Field(0.01, ge=0, description="lambda per character of the length-penalised online run")
    offline: bool = Field(True, description="train the offline DPO baseline")
    gold_judge: bool = Field(True, description="also run the online loop with the gold reward as the judge")


def run_demo(cfg: DemoConfig) -> dict:
    if cfg.seeds:
        return _run_seeds(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _with_paths(cfg, out)
    save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    sft_model = out / "sft" / "model"
    _stage("sandbox data", out / "data" / "stats.json", make_data, cfg.data)
    _stage("tiny model", out / "init" / "config.json", init_model, cfg.model)
    _stage("SFT", sft_model / "config.json", run_sft, cfg.sft)
    _stage("BT reward model", out / "rm" / "model" / "config.json", run_rm_train, cfg.rm)
    _stage("preference model", out / "pm" / "model" / "config.json", run_pm_train, cfg.pm)
    test = str(out / "data" / "prefs_test.jsonl")
    for name, cls, fn, key, length in (("BT eval", RMEvalConfig, run_rm_eval, "rm", cfg.rm.data.max_length),
                                       ("PM eval", PMEvalConfig, run_pm_eval, "pm", cfg.pm.data.max_length)):
        judge = cls(model=ModelConfig(path=str(out / key / "model")), input=test, max_length=length,
                    out=str(out / "eval" / f"{key}.json"), progress=False)
        _stage(name, out / "eval" / f"{key}.json", fn, judge)
    _stage("online iterative DPO", out / "online" / "summary.json", run_loop, cfg.online)
    lp = cfg.online.model_copy(deep=True)
    lp.out = str(out / "online_length_penalty")
    lp.select.length_penalty = cfg.length_penalty
    _stage(f"online iterative DPO, length penalty {cfg.length_penalty}/char",
           out / "online_length_penalty" / "summary.json", run_loop, lp)
    if cfg.gold_judge:
        oracle = cfg.online.model_copy(deep=True)
        oracle.out = str(out / "online_gold_judge")
        oracle.annotate.annotator.kind = "gold"
        _stage("online iterative DPO, gold reward as the judge (reference run)",
               out / "online_gold_judge" / "summary.json", run_loop, oracle)
    if cfg.offline:
        _stage("offline DPO", out / "offline" / "model" / "config.json", _offline_dpo, cfg, out)
        _stage("offline DPO eval", out / "eval" / "offline.json", _evaluate, cfg, out / "offline" / "model",
               out / "eval" / "offline.json")
    summary = _summary(cfg, out)
    write_json(out / "summary.json", summary)
    run_report(ReportConfig(run_dir=str(out)))
    print("\n" + _screen(summary))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; report: {out / 'report.md'}")
    return summary


def _with_paths(cfg: DemoConfig, out: Path) -> DemoConfig:
    cfg = cfg.model_copy(deep=True)
    data, sft = out / "data", str(out / "sft" / "model")
    cfg.data.out, cfg.data.seed = str(data), cfg.seed
    cfg.model.out, cfg.model.seed = str(out / "init"), cfg.seed
    cfg.sft.model.path, cfg.sft.data.train = str(out / "init"), str(data / "sft.jsonl")
    for stage, name in ((cfg.sft, "sft"), (cfg.rm, "rm"), (cfg.pm, "pm")):
        stage.train.output_dir, stage.train.seed = str(out / name), cfg.seed
    for stage in (cfg.rm, cfg.pm):  # judges start from the SFT model, as in the paper
        stage.model.path = sft
        stage.data.train, stage.data.test = str(data / "prefs_train.jsonl"), str(data / "prefs_test.jsonl")
    o = cfg.online
    o.out, o.seed, o.policy.path = str(out / "online"), cfg.seed, sft
    o.prompts.source = str(data / "prompts_train.jsonl")
    o.annotate.annotator.path = str(out / "rm" / "model")
    o.eval.prompts = str(data / "prompts_eval.jsonl")
    return cfg


def _stage(name: str, done_marker: Path, fn, *args) -> None:
    if done_marker.exists():
        print(f"[demo] {name}: done already")
        return
    print(f"[demo] {name} ...", flush=True)
    t = time.perf_counter()
    fn(*args)
    print(f"[demo] {name}: {time.perf_counter() - t:.0f}s", flush=True)


def _offline_dpo(cfg: DemoConfig, out: Path) -> None:
    """DPO from SFT on the first N fixed annotator pairs, N = what the online run labels."""
    budget = cfg.online.iterations * cfg.online.prompts.per_iteration
    rows = islice(iter_rows(out / "data" / "prefs_train.jsonl"), budget)
    write_jsonl(out / "offline" / "pairs.jsonl", (row for _, row in rows))
    dpo = cfg.online.dpo.model_copy(deep=True)
    dpo.model.path = dpo.reference.path = cfg.online.policy.path
    dpo.data.train = str(out / "offline" / "pairs.jsonl")
    dpo.train.output_dir, dpo.train.seed = str(out / "offline"), cfg.seed
    run_dpo(dpo)


def _evaluate(cfg: DemoConfig, policy: Path, path: Path) -> None:
    o = cfg.online
    metrics = evaluate_iteration(str(policy), o.policy.path, o.policy, o.eval, o.annotate.annotator,
                                 seed=o.seed, iteration_dir=None)
    write_json(path, {"policy": str(policy), **metrics})


# --------------------------------------------------------------------------- summary


def _read_if_there(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _summary(cfg: DemoConfig, out: Path) -> dict:
    online = _read_if_there(out / "online" / "summary.json")["iterations"]
    lp = _read_if_there(out / "online_length_penalty" / "summary.json")["iterations"]
    policies = {"sft": online[0]}
    if cfg.offline:
        policies["offline_dpo"] = _read_if_there(out / "eval" / "offline.json")
    judges = {}
    for name, key in (("BT reward model", "rm"), ("preference model", "pm")):
        r = _read_if_there(out / "eval" / f"{key}.json")
        if r:
            judges[name] = {"per_subset": r["subsets"], "accuracy": r["overall"]}
    runs = {"online": online, f"online_length_penalty_{cfg.length_penalty}": lp}
    if cfg.gold_judge:
        runs["online_gold_judge"] = _read_if_there(out / "online_gold_judge" / "summary.json")["iterations"]
    summary = {"seed": cfg.seed, "policies": policies, "runs": runs,
               "reward_models": {k: v for k, v in judges.items() if v}}
    summary["headline"] = headline(summary)
    summary["claims"] = claims(summary["headline"])
    return summary


def headline(summary: dict) -> dict:
    runs = list(summary["runs"].values())
    online, lp = runs[0][-1], runs[1][-1]
    oracle = summary["runs"].get("online_gold_judge", [{}])[-1]
    off = summary["policies"].get("offline_dpo") or {}
    rms = summary["reward_models"]
    sub = {name: {s: r["per_subset"][s]["accuracy"] for s in r["per_subset"]} for name, r in rms.items()}
    return {
        "gold_sft": summary["policies"]["sft"].get("gold_reward"),
        "gold_offline": off.get("gold_reward"),
        "gold_online": online.get("gold_reward"),
        "gold_online_lp": lp.get("gold_reward"),
        "gold_online_gold_judge": oracle.get("gold_reward"),
        "rm_sft": summary["policies"]["sft"].get("rm_reward"), "rm_online": online.get("rm_reward"),
        "tokens_online": online.get("mean_tokens"), "tokens_online_lp": lp.get("mean_tokens"),
        "chars_online": online.get("mean_chars"), "chars_online_lp": lp.get("mean_chars"),
        "bt_reasoning": sub.get("BT reward model", {}).get("reasoning"),
        "bt_chat": sub.get("BT reward model", {}).get("chat"),
        "pm_reasoning": sub.get("preference model", {}).get("reasoning"),
        "pm_chat": sub.get("preference model", {}).get("chat"),
    }


def claims(h: dict) -> list[str]:
    out = []

    def yes(ok: bool) -> str:
        return "reproduces" if ok else "does NOT reproduce"

    if None not in (h["gold_sft"], h["gold_offline"], h["gold_online"]):
        ok = h["gold_online"] > h["gold_offline"] > h["gold_sft"]
        out.append(f"online > offline > SFT on gold reward: {yes(ok)} (SFT {h['gold_sft']:.3f}, "
                   f"offline DPO {h['gold_offline']:.3f}, online iterative DPO {h['gold_online']:.3f})")
    if None not in (h["chars_online"], h["chars_online_lp"]):
        cut = 1 - h["chars_online_lp"] / h["chars_online"]
        out.append(f"a length penalty cuts length at a small gold cost: length {-cut:+.0%} "
                   f"({h['chars_online']:.0f} -> {h['chars_online_lp']:.0f} chars), gold "
                   f"{h['gold_online']:.3f} -> {h['gold_online_lp']:.3f}")
    if None not in (h["gold_sft"], h.get("gold_online_gold_judge")):
        out.append(f"with the gold reward as the judge, online iterative DPO raises the gold reward: "
                   f"{yes(h['gold_online_gold_judge'] > h['gold_sft'])} (SFT {h['gold_sft']:.3f} -> "
                   f"{h['gold_online_gold_judge']:.3f}); with the learned BT judge the reward-model "
                   f"reward went {h['rm_sft']:.3f} -> {h['rm_online']:.3f}")
    if None not in (h["bt_reasoning"], h["pm_reasoning"]):
        out.append(f"the PM is the better judge on reasoning: {yes(h['pm_reasoning'] > h['bt_reasoning'])} "
                   f"(reasoning: BT {h['bt_reasoning']:.3f}, PM {h['pm_reasoning']:.3f}; chat: BT "
                   f"{h['bt_chat']:.3f}, PM {h['pm_chat']:.3f})")
    return out


def _screen(summary: dict) -> str:
    h = summary["headline"]
    rows = [("SFT", h["gold_sft"], summary["policies"]["sft"].get("mean_tokens")),
            ("offline DPO", h["gold_offline"], (summary["policies"].get("offline_dpo") or {}).get("mean_tokens")),
            ("online iterative DPO", h["gold_online"], h["tokens_online"]),
            ("online + length penalty", h["gold_online_lp"], h["tokens_online_lp"]),
            ("online, gold judge", h.get("gold_online_gold_judge"), None)]
    lines = [f"{'policy':<26} {'gold reward':>11} {'tokens':>7}"]
    lines += [f"{n:<26} {'-' if g is None else f'{g:.3f}':>11} {'-' if t is None else f'{t:.1f}':>7}"
              for n, g, t in rows]
    return "\n".join(lines + [""] + [f"- {c}" for c in summary["claims"]])


def _run_seeds(cfg: DemoConfig) -> dict:
    results = {}
    for seed in cfg.seeds:
        one = cfg.model_copy(update={"seeds": None, "seed": seed, "out": str(Path(cfg.out) / f"seed_{seed}")})
        results[seed] = run_demo(one)["headline"]
    keys = list(next(iter(results.values())))
    lines = ["| quantity | " + " | ".join(f"seed {s}" for s in results) + " | mean | spread (sd) |",
             "|---" * (len(results) + 3) + "|"]
    agg = {}
    for k in keys:
        vals = [results[s][k] for s in results if results[s][k] is not None]
        if not vals:
            continue
        mean, sd = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
        agg[k] = {"mean": mean, "sd": sd, "values": vals}
        lines.append(f"| {k} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {mean:.3f} | {sd:.3f} |")
    write_json(Path(cfg.out) / "seeds.json", {"per_seed": results, "aggregate": agg})
    write_text(Path(cfg.out) / "seeds.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"per_seed": results, "aggregate": agg}
