"""``rlhf demo``: the whole workflow on the built-in sandbox, on a laptop CPU, resumable.

1. sandbox data, a tokenizer and a tiny policy; 2. SFT; 3. from the SFT model, on the sandbox
preference pairs: a BT reward model, a pairwise preference model and (``judge=dpo``, the
default) a DPO judge, each evaluated per subset and skill; 4. offline DPO from the SFT model on
a fixed set of annotator pairs as large as the online run labels in total; 5. online iterative
DPO (3 iterations, n = 8, max_min pairs, reference = SFT) judged by the DPO judge's implicit
reward (the paper's premise of a judge that prefers what gold prefers; ``judge=bt``: the BT
model); 6. the same online run with a length penalty, and with the BT model as the judge
(``bt_judge``: what a weak judge does), optionally with the gold reward (``gold_judge``: an
oracle reference run) and the PM tournament (``pm_judge``) as judges; 7. gold evaluation of
every policy on 1700 held-out prompts x 4 samples, with standard errors clustered by prompt and
differences paired by prompt (the loop's evaluation, one code path for all); 8. ``report.md``
/ ``report.html`` with plots.

Every stage writes under ``out`` and is skipped when its output exists, so re-running the
command continues a half-finished demo. Paths inside the stage sections are set by the demo;
every other option can be overridden, e.g. ``rlhf demo online.dpo.optim.lr=3e-4``.
With ``seeds=[0,1,2]`` the demo runs once per seed (``out/seed_K``) and ``out/seeds.md``
gives the mean and spread of the headline numbers.
"""

from __future__ import annotations

import json
import time
from itertools import islice
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .config import Config, ModelConfig, OptimConfig, TrainConfig, save_config
from .data.readers import iter_rows
from .demo_results import aggregate, annotator_agreement, claims, headline, mean_seconds, screen
from .evaluation.iteration import HeldOutConfig, evaluate_iteration
from .evaluation.judges import PMEvalConfig, RMEvalConfig, run_pm_eval, run_rm_eval
from .evaluation.policy import paired_difference
from .generation.sampling import SamplingConfig
from .io import write_json, write_jsonl, write_text
from .losses import DPOLoss
from .models.tiny import InitModelConfig, init_model
from .online.annotate import AnnotateConfig, AnnotatorConfig
from .online.generate import GenerateConfig
from .online.loop import SET as BY_LOOP
from .online.loop import LoopConfig, PromptPoolConfig, run_loop
from .online.pairs import SelectConfig
from .report import ReportConfig, run_report
from .reward.bt import PairDataConfig, RMConfig, RMDataConfig, run_rm_train
from .reward.pm import PMConfig, run_pm_train
from .reward.ranking import rank
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
    optim=OptimConfig(lr=1e-4, warmup_ratio=0.03),  # lr and epochs: the pilot grid of preregistration.md
    train=TrainConfig(output_dir=BY_LOOP, **_QUIET, epochs=2, global_batch_size=16, micro_batch_size=16,
                      log_every=10, save_every=50),
)
SANDBOX_DPO_JUDGE = DPOConfig(  # judge=dpo: DPO from the judge backbone on the judge's pairs (preregistration.md)
    model=ModelConfig(path=SET), reference=ReferenceConfig(path=SET),
    data=DPODataConfig(train=SET, max_length=256), loss=LossConfig(beta=0.1),
    optim=OptimConfig(lr=3e-4, warmup_ratio=0.03),
    train=_train(epochs=1, global_batch_size=16, micro_batch_size=16, log_every=50, save_every=0),
)
SANDBOX_LOOP = LoopConfig(
    out=SET, iterations=3, policy=ModelConfig(path=SET), reference="sft",
    prompts=PromptPoolConfig(source=SET, per_iteration=200),
    generate=GenerateConfig(model=ModelConfig(path=BY_LOOP), input=BY_LOOP, out=BY_LOOP, chunk_size=100,
                            sampling=SamplingConfig(n=8, temperature=1.0, max_new_tokens=48, batch_size=50)),
    annotate=AnnotateConfig(input=BY_LOOP, out=BY_LOOP, annotator=AnnotatorConfig(path=SET, dtype="fp32", max_length=256)),
    select=SelectConfig(strategy="max_min"),
    dpo=SANDBOX_DPO,
    eval=HeldOutConfig(prompts=SET, limit=0, sampling=SamplingConfig(n=4, temperature=1.0, max_new_tokens=48,
                                                                          batch_size=100)),
)


REGIMES = {"premise": 0.0, "misspecified": 0.05}  # the annotator's extra preference per word
Regime = Literal["premise", "misspecified"]


class DemoConfig(Config):
    out: str = Field("runs/demo", description="run directory of the demo")
    seed: int = Field(0, description="seed of the data, the model initialisation and training")
    seeds: list[int] | None = Field(None, description="run the demo once per seed and summarise mean/spread")
    regime: Regime = Field(
        "premise", description="premise: the annotator prefers what gold prefers, up to noise (data.length_bias "
        "0, the paper's premise); misspecified: it also pays 0.05 per word, more than gold's filler price "
        "0.02, so on chat pairs it prefers the opposite of gold (sets data.length_bias)")
    regimes: list[Regime] | None = Field(None, description="run the demo once per regime, side by side")
    data: MakeDataConfig = MakeDataConfig(n_prefs=20000, n_eval_prompts=1700)  # (1700: preregistration.md)
    model: InitModelConfig = InitModelConfig()
    sft: SFTConfig = SANDBOX_SFT
    judge_model: InitModelConfig | None = Field(
        None, description="backbone of both judges: None = the policy's SFT model (the paper's choice); a "
        "model config (e.g. judge_model.hidden_size=256) = a separate model, SFT-trained on the same "
        "demonstrations with judge_sft's settings, from which the RM and the PM start")
    judge_sft: SFTConfig = SANDBOX_SFT
    judge: Literal["bt", "dpo"] = Field(
        "dpo", description="the headline online loop's judge: dpo = the DPO implicit reward beta * log(pi/pi_backbone) "
        "of a policy DPO-trained from the judge backbone on the judge's pairs (dpo_judge's settings), a judge that "
        "checks answers against the question, the paper's premise of a strong judge (docs/preregistration.md); "
        "bt = the BT reward model (the paper's judge, weak on the sandbox's reasoning)")
    bt_judge: bool = Field(True, description="with judge=dpo, also run the online loop with the BT reward model as "
                           "the judge: what a weak judge does, the contrast to the headline")
    dpo_judge: DPOConfig = SANDBOX_DPO_JUDGE
    rm: RMConfig = SANDBOX_RM
    pm: PMConfig = SANDBOX_PM
    online: LoopConfig = SANDBOX_LOOP
    length_penalty: float = Field(0.01, ge=0, description="lambda per character of the length-penalised online run")
    offline: bool = Field(True, description="train the offline DPO baseline")
    gold_judge: bool = Field(False, description="also run the online loop with the gold reward as the judge")
    pm_judge: bool = Field(False, description="also run the online loop with the PM (tournament) as the judge")

    @model_validator(mode="after")
    def _dpo_judge_reads_its_loss(self) -> DemoConfig:
        loss = self.dpo_judge.loss
        if self.judge == "dpo" and (loss.kind not in (DPOLoss.SIGMOID, DPOLoss.HINGE) or loss.average_logps):
            raise ValueError("judge=dpo reads beta * (summed log-ratio) as the reward, the quantity the sigmoid and "
                             "hinge losses train: dpo_judge.loss.kind must be sigmoid or hinge, without average_logps")
        return self


def run_demo(cfg: DemoConfig) -> dict:
    if cfg.seeds or cfg.regimes:
        return _run_grid(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _with_paths(cfg, out)
    save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    sft_model = out / "sft" / "model"
    _stage("sandbox data", out / "data" / "stats.json", make_data, cfg.data)
    _stage("tiny model", out / "init" / "config.json", init_model, cfg.model)
    _stage("SFT", sft_model / "config.json", run_sft, cfg.sft)
    if cfg.judge_model is not None:
        _stage("judge backbone", out / "judge_init" / "config.json", init_model, cfg.judge_model)
        _stage("judge SFT", out / "judge_sft" / "model" / "config.json", run_sft, cfg.judge_sft)
    _stage("BT reward model", out / "rm" / "model" / "config.json", run_rm_train, cfg.rm)
    _stage("preference model", out / "pm" / "model" / "config.json", run_pm_train, cfg.pm)
    if cfg.judge == "dpo":
        _stage("DPO judge", out / "dpo_judge" / "model" / "config.json", run_dpo, cfg.dpo_judge)
    gold_test, skills_test = out / "data" / "prefs_test_gold.jsonl", out / "data" / "prefs_test_gold_skills.jsonl"
    _stage("test pairs in gold order", skills_test, _gold_ordered, out / "data" / "prefs_test.jsonl", gold_test,
           skills_test)
    for name, key, judge in _judges(cfg, out):
        for labels, test, against in (("", out / "data" / "prefs_test.jsonl", "the annotator"),
                                      ("_gold", gold_test, "gold"), ("_gold_skills", skills_test, "gold, per skill")):
            result = out / "eval" / f"{key}{labels}.json"
            run = judge.model_copy(update={"input": str(test), "out": str(result), "progress": False})
            _stage(f"{name} eval against {against}", result, run_pm_eval if key == "pm" else run_rm_eval, run)
    for run, title in _runs(cfg):
        _stage(title, Path(run.out) / "summary.json", run_loop, run)
    if cfg.offline:
        _stage("offline DPO", out / "offline" / "model" / "config.json", _offline_dpo, cfg, out / "data", out / "offline")
        _stage("offline DPO eval", out / "eval" / "offline.json", _evaluate, cfg, out / "offline" / "model",
               out / "eval" / "offline.json")
    summary = _summary(cfg, out)
    write_json(out / "summary.json", summary)
    run_report(ReportConfig(run_dir=str(out)))
    print("\n" + screen(summary))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; report: {out / 'report.md'}")
    return summary


def _judges(cfg: DemoConfig, out: Path) -> list[tuple[str, str, RMEvalConfig | PMEvalConfig]]:
    """(name, folder, evaluation config) of each trained judge."""
    judges = [("BT", "rm", RMEvalConfig(model=ModelConfig(path=str(out / "rm" / "model")),
                                         max_length=cfg.rm.data.max_length)),
              ("PM", "pm", PMEvalConfig(model=ModelConfig(path=str(out / "pm" / "model")),
                                         max_length=cfg.pm.data.max_length))]
    if cfg.judge == "dpo":
        judges.append(("DPO", "dpo_judge", RMEvalConfig(
            model=ModelConfig(path=str(out / "dpo_judge" / "model")), max_length=cfg.dpo_judge.data.max_length,
            reference=cfg.dpo_judge.reference.path, beta=cfg.dpo_judge.loss.resolved_beta)))
    return judges


def _runs(cfg: DemoConfig) -> list[tuple[LoopConfig, str]]:
    """The online runs: the headline judge; with a length penalty; the BT model (with judge=dpo), the
    gold reward and the PM as judges."""
    out = Path(cfg.out)

    def variant(name: str, fn) -> LoopConfig:
        run = cfg.online.model_copy(deep=True)
        run.out = str(out / name)
        fn(run)
        return run

    runs = [(cfg.online, "online iterative DPO"),
            (variant("online_length_penalty", lambda r: setattr(r.select, "length_penalty", cfg.length_penalty)),
             f"online iterative DPO, length penalty {cfg.length_penalty}/char")]
    if cfg.judge == "dpo" and cfg.bt_judge:
        def bt(r: LoopConfig) -> None:
            r.annotate.annotator = r.annotate.annotator.model_copy(update={
                "kind": "bt", "path": str(out / "rm" / "model"), "max_length": cfg.rm.data.max_length,
                "reference": None})
        runs.append((variant("online_bt_judge", bt), "online iterative DPO, BT reward model as the judge (contrast)"))
    if cfg.gold_judge:
        def gold(r: LoopConfig) -> None:
            r.annotate.annotator = r.annotate.annotator.model_copy(update={"kind": "gold", "reference": None})
        runs.append((variant("online_gold_judge", gold),
                     "online iterative DPO, gold reward as the judge (reference run)"))
    if cfg.pm_judge:
        def pm(r: LoopConfig) -> None:
            r.annotate.annotator = r.annotate.annotator.model_copy(update={
                "kind": "pm", "path": str(out / "pm" / "model"), "max_length": cfg.pm.data.max_length,
                "reference": None})
        runs.append((variant("online_pm_judge", pm), "online iterative DPO, PM tournament as the judge"))
    return runs


def _with_paths(cfg: DemoConfig, out: Path) -> DemoConfig:
    cfg = cfg.model_copy(deep=True)
    data, sft = out / "data", str(out / "sft" / "model")
    cfg.data.out, cfg.data.seed, cfg.data.length_bias = str(data), cfg.seed, REGIMES[cfg.regime]
    cfg.model.out, cfg.model.seed = str(out / "init"), cfg.seed
    cfg.sft.model.path, cfg.sft.data.train = str(out / "init"), str(data / "sft.jsonl")
    for stage, name in ((cfg.sft, "sft"), (cfg.rm, "rm"), (cfg.pm, "pm")):
        stage.train.output_dir, stage.train.seed = str(out / name), cfg.seed
    judge = sft
    if cfg.judge_model is not None:  # a separate backbone, SFT-trained on the same demonstrations
        cfg.judge_model.out, cfg.judge_model.seed = str(out / "judge_init"), cfg.seed
        js = cfg.judge_sft
        js.model.path, js.data.train = str(out / "judge_init"), str(data / "sft.jsonl")
        js.train.output_dir, js.train.seed = str(out / "judge_sft"), cfg.seed
        judge = str(out / "judge_sft" / "model")
    for stage in (cfg.rm, cfg.pm):  # judges start from an SFT model, as in the paper
        stage.model.path = judge
        stage.data.train, stage.data.test = str(data / "prefs_train.jsonl"), str(data / "prefs_test.jsonl")
    dj = cfg.dpo_judge
    dj.model.path, dj.reference.path, dj.data.train = judge, judge, str(data / "prefs_train.jsonl")
    dj.train.output_dir, dj.train.seed = str(out / "dpo_judge"), cfg.seed
    o = cfg.online
    o.out, o.seed, o.policy.path = str(out / "online"), cfg.seed, sft
    o.prompts.source = str(data / "prompts_train.jsonl")
    o.annotate.annotator.path = str(out / "rm" / "model")
    if cfg.judge == "dpo":
        o.annotate.annotator = o.annotate.annotator.model_copy(update={
            "kind": "dpo", "path": str(out / "dpo_judge" / "model"), "reference": judge,
            "beta": dj.loss.resolved_beta})
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


def _gold_ordered(src: Path, dst: Path, by_skill: Path) -> None:
    """The held-out pairs with chosen = the response gold prefers (a judge's accuracy against
    gold, beside its accuracy against the annotator's noisy labels); ``by_skill``: the same
    pairs with subset ``<subset>/<skill>`` (which questions a judge can check)."""
    rows = []
    for _, r in iter_rows(src):
        m = r["meta"]
        if m["gold_chosen"] < m["gold_rejected"]:
            r = {**r, "chosen": r["rejected"], "rejected": r["chosen"]}
        rows.append(r)
    write_jsonl(dst, rows)
    write_jsonl(by_skill, ({**r, "subset": f"{r['subset']}/{r['meta']['skill']}"} for r in rows))


def _offline_dpo(cfg: DemoConfig, data: Path, folder: Path) -> None:
    """DPO from SFT on the first N fixed annotator pairs of ``data``, N = what the online run
    labels, into ``folder`` (its pairs.jsonl and model)."""
    budget = cfg.online.iterations * cfg.online.prompts.per_iteration
    rows = islice(iter_rows(data / "prefs_train.jsonl"), budget)
    write_jsonl(folder / "pairs.jsonl", (row for _, row in rows))
    dpo = cfg.online.dpo.model_copy(deep=True)
    dpo.model.path = dpo.reference.path = cfg.online.policy.path
    dpo.data.train = str(folder / "pairs.jsonl")
    dpo.train.output_dir, dpo.train.seed = str(folder), cfg.seed
    run_dpo(dpo)


def _evaluate(cfg: DemoConfig, policy: Path, path: Path) -> None:
    o = cfg.online
    sft_gold = Path(o.out) / "iter_0" / "eval_gold.jsonl"  # (for the difference to SFT, paired by prompt)
    metrics = evaluate_iteration(str(policy), o.policy.path, o.policy, o.eval, o.annotate.annotator,
                                 seed=o.seed, iteration_dir=None,
                                 paired=(str(path.with_name(f"{path.stem}_gold.jsonl")),
                                         str(sft_gold) if sft_gold.exists() else None))
    write_json(path, {"policy": str(policy), **metrics})


# --------------------------------------------------------------------------- summary


def _read_if_there(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _summary(cfg: DemoConfig, out: Path) -> dict:
    runs = {_run_name(cfg, Path(run.out).name): _read_if_there(Path(run.out) / "summary.json")["iterations"]
            for run, _ in _runs(cfg)}
    policies = {"sft": runs["online"][0]}
    if cfg.offline:
        policies["offline_dpo"] = _read_if_there(out / "eval" / "offline.json")
    judges, trained = {}, [(name, key) for name, key, _ in _judges(cfg, out)]
    for name, key in trained:
        for labels, suffix in (("annotator", ""), ("gold", "_gold")):
            r = _read_if_there(out / "eval" / f"{key}{suffix}.json")
            if r:
                judges[f"{name} vs {labels}"] = {"per_subset": r["subsets"], "accuracy": r["overall"]}
    judges["annotator vs gold (ceiling)"] = annotator_agreement(out / "data" / "prefs_test.jsonl")
    skills = {f"{name} vs gold": {s: v["accuracy"] for s, v in r["subsets"].items()}
              for name, key in trained if (r := _read_if_there(out / "eval" / f"{key}_gold_skills.json"))}
    seconds = {name: mean_seconds(its, "annotate") for name, its in runs.items()}
    n = cfg.online.generate.sampling.n
    cost = {"comparisons_per_prompt": rank(lambda m: [0.5] * len(m), [n], cfg.online.annotate.annotator.pm_mode)[0]
            .n_calls // 2, "annotate_seconds_per_iteration": seconds}
    summary = {"seed": cfg.seed, "regime": cfg.regime, "judge": cfg.judge, "length_bias": cfg.data.length_bias,
               "policies": policies, "runs": runs, "reward_models": judges, "judge_skills": skills, "judge_cost": cost,
               "online_vs_offline": _online_vs_offline(cfg, out)}
    summary["headline"] = headline(summary)
    summary["claims"] = claims(summary["headline"], cfg.judge.upper())
    return summary


def _online_vs_offline(cfg: DemoConfig, out: Path) -> dict | None:
    """The last online iteration's gold reward minus the offline DPO's, paired by held-out prompt."""
    files = (Path(cfg.online.out) / f"iter_{cfg.online.iterations}" / "eval_gold.jsonl", out / "eval" / "offline_gold.jsonl")
    if not all(f.exists() for f in files):
        return None
    return paired_difference(*([row["gold"] for _, row in iter_rows(f)] for f in files))


def _run_name(cfg: DemoConfig, folder: str) -> str:
    return f"online_length_penalty_{cfg.length_penalty}" if folder == "online_length_penalty" else folder


def _run_grid(cfg: DemoConfig) -> dict:
    """One demo per (regime, seed) under ``out/<regime>/seed_<k>``; ``out/seeds.md`` gives each
    headline quantity's mean and sd per regime, side by side."""
    regimes, seeds = cfg.regimes or [cfg.regime], cfg.seeds or [cfg.seed]
    results: dict[str, dict[int, dict]] = {}
    for regime in regimes:
        for seed in seeds:
            folder = Path(cfg.out) / (regime if cfg.regimes else "") / f"seed_{seed}"
            one = cfg.model_copy(update={"seeds": None, "regimes": None, "seed": seed, "regime": regime,
                                         "out": str(folder)})
            results.setdefault(regime, {})[seed] = run_demo(one)["headline"]
    agg, lines = aggregate(results, seeds)
    write_json(Path(cfg.out) / "seeds.json", {"per_seed": results, "aggregate": agg})
    write_text(Path(cfg.out) / "seeds.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"per_seed": results, "aggregate": agg}
