"""``rlhf loop``: online iterative DPO (RECIPE.md, section 3) as one resumable command.

For t = 1..T: take a fresh slice of the prompt pool, sample n responses per prompt from
pi_{t-1}, reward them, pick one pair per prompt, run DPO from pi_{t-1} against the
reference (the SFT model pi_0 by default, or pi_{t-1}), and evaluate pi_t. The run
directory records every completed stage in ``state.json``; re-running the same command
continues at the first incomplete stage (generation, annotation and DPO also resume inside
a stage). Layout::

    runs/NAME/config.yaml  state.json  summary.json  summary.md
    runs/NAME/iter_0/metrics.json                   (the SFT policy)
    runs/NAME/iter_k/prompts.jsonl rollouts.jsonl scored.jsonl pairs.jsonl dpo/ metrics.json eval_gold.jsonl
"""

from __future__ import annotations

import json
import os
import time
from array import array
from collections.abc import Callable
from pathlib import Path

import yaml

from ..checks import run_check
from ..config import Config, flatten, save_config
from ..data.readers import iter_records, iter_rows, validated_rows
from ..data.records import Prompt, Rollout
from ..errors import UserError
from ..evaluation.iteration import IterationEvalConfig, run_iteration_eval
from ..faults import point
from ..io import read_json, remove_stale_temporaries, write_json, write_jsonl, write_text
from ..manifest import write_manifest
from ..report import ReportConfig, run_report, with_se
from ..training.dpo import DPOConfig, run_dpo
from ..training.loop import make_trackers
from .annotate import run_annotate
from .chunks import locked
from .config import SET, LoopConfig, PromptPoolConfig
from .generate import GenerateConfig, run_generate
from .pairs import build_pairs

STAGES = ("prompts", "generate", "annotate", "pairs", "dpo", "eval")


class RunState:
    """Which stages of which iteration are complete, with their wall-clock seconds."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"completed": {}}

    def done(self, key: str) -> bool:
        return key in self.data["completed"]

    def mark(self, key: str, seconds: float) -> None:
        self.data["completed"][key] = round(seconds, 2)
        write_json(self.path, self.data)


def run_loop(cfg: LoopConfig, after_stage: Callable[[str], None] | None = None) -> dict:
    out = Path(cfg.out)
    _refuse_owned_keys(cfg)
    run_check(cfg)  # template, BOS/EOS, pad and length mismatches: before the hours start
    with locked(out):  # one loop at a time in a run folder
        return _loop(cfg, out, after_stage)


def _loop(cfg: LoopConfig, out: Path, after_stage: Callable[[str], None] | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    _check_config(cfg, out / "config.yaml")
    write_manifest(out, cfg)
    remove_stale_temporaries(out)  # what a killed run was writing
    pool = _check_pool(cfg.prompts, out)  # bad records and repeated ids: before the hours start
    state = RunState(out / "state.json")
    print(f"loop: {cfg.iterations} iterations, reference = {cfg.reference} "
          f"({'pi_0 = ' + cfg.policy.path if cfg.reference == 'sft' else 'previous policy'}), "
          f"pairs = {cfg.select.strategy}, annotator = {cfg.annotate.annotator.kind}")

    def stage(key: str, fn: Callable, *args) -> None:
        if state.done(key):
            return
        t0 = time.perf_counter()
        fn(*args)
        state.mark(key, time.perf_counter() - t0)
        if after_stage is not None:
            after_stage(key)

    trackers = make_trackers(cfg.report_to, out, cfg)
    sft = cfg.policy.path
    stage("iter_0/eval", _evaluate, cfg, 0, sft, sft, out / "iter_0")
    rows = [read_json(out / "iter_0" / "metrics.json")]
    _track(trackers, rows[0], None)
    policy = sft
    for t in range(1, cfg.iterations + 1):
        d = out / f"iter_{t}"
        d.mkdir(exist_ok=True)
        ref = sft if cfg.reference == "sft" else policy
        stage(f"iter_{t}/prompts", _slice_prompts, cfg, t, d / "prompts.jsonl", pool)
        gen = _generate_config(cfg, policy, t, d)
        stage(f"iter_{t}/generate", _launch, cfg, "generate", gen, d / "generate.yaml",
              cfg.processes if gen.backend == "hf" else 1, gen.backend == "vllm" and bool(cfg.launcher))
        stage(f"iter_{t}/annotate", _launch, cfg, "annotate", cfg.annotate.model_copy(
            update={"input": str(d / "rollouts.jsonl"), "out": str(d / "scored.jsonl")}), d / "annotate.yaml")
        stage(f"iter_{t}/pairs", _pairs, cfg, t, d)
        stage(f"iter_{t}/dpo", _launch, cfg, "dpo", _dpo_config(cfg, policy, ref, d), d / "dpo.yaml")
        policy = str(d / "dpo" / "model")
        stage(f"iter_{t}/eval", _evaluate, cfg, t, policy, sft, d)
        row = read_json(d / "metrics.json")
        row["seconds"] = {s: state.data["completed"].get(f"iter_{t}/{s}") for s in STAGES}
        rows.append(row)
        print(_one_line(row))
        _track(trackers, row, d / "pairs.jsonl")
    for tracker in trackers:
        tracker.finish()
    summary = {"reference": cfg.reference, "iterations": rows}
    write_json(out / "summary.json", summary)
    point("summary")
    write_text(out / "summary.md", summary_table(rows))
    point("report")
    run_report(ReportConfig(run_dir=str(out)))
    print(f"loop: done; {out / 'summary.md'}")
    return summary


# --------------------------------------------------------------------------- stages

RUNNERS = {"generate": run_generate, "annotate": run_annotate, "dpo": run_dpo, "eval iteration": run_iteration_eval}


def _launch(cfg: LoopConfig, command: str, stage_cfg: Config, config_path: Path,
            processes: int | None = None, per_node: bool = False) -> None:
    """Run a stage on ``processes`` ranks started by the launcher (torchrun by default), every
    stage through a configured launcher (``per_node``: one process per node, vLLM generation on
    several nodes, each node's process starting that node's engines). One process with no
    launcher: in this process on a CPU-only machine, in a child process of its own where there
    is a GPU, so the loop's process never holds GPU memory and each stage returns all of its
    memory when it ends."""
    import subprocess
    import sys

    processes = cfg.processes if processes is None else processes
    if processes == 1 and not cfg.launcher and not per_node and not _has_gpu():
        RUNNERS[command](stage_cfg)
        return
    save_config(stage_cfg, config_path)
    if processes == 1 and not cfg.launcher:
        launcher = [sys.executable]
    else:
        launcher = cfg.launcher or [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "{processes}"]
    cmd = [*(a.replace("{processes}", str(processes)) for a in launcher),
           "-m", "rlhf_workflow.cli", *command.split(), "--config", str(config_path)]
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"{command} on {processes} processes failed; re-run to continue")


def _has_gpu() -> bool:
    """Whether a GPU is visible, asked without initialising CUDA in this process."""
    import torch

    return torch.cuda.device_count() > 0


def _check_pool(src: PromptPoolConfig, out: Path) -> int:
    """The pool's size, after one streamed pass that validates every record and refuses a
    repeated id (each iteration's records are matched by id), then a check that the pool is the
    one the run's first iteration sliced (a refused pool is not recorded). Memory: an 8-byte id hash per prompt."""
    import numpy as np

    hashes = array("q", (-1 if rec.id is None else hash(json.dumps(rec.id))
                         for rec in iter_records(src.source, Prompt, src.split)))
    given = np.sort(np.frombuffer(hashes, dtype=np.int64))
    given = given[given != -1]
    repeated = set(given[1:][given[1:] == given[:-1]].tolist())
    seen: dict[str, str] = {}
    for at, rec, _ in validated_rows(src.source, Prompt, src.split) if repeated else ():
        key = json.dumps(rec.id)
        if rec.id is not None and hash(key) in repeated:
            if key in seen:
                raise UserError(f"{at}: field 'id': {rec.id!r} is also the id of {seen[key]}: the ids of a "
                                "prompt pool must be unique (the loop matches each iteration's records by id)")
            seen[key] = at.rsplit(", ", 1)[-1]
    _same_pool(src, out / "pool.json")
    return len(hashes)


def _slice_prompts(cfg: LoopConfig, t: int, path: Path, n: int) -> None:
    """Iteration t's disjoint slice of the shuffled pool of ``n`` prompts, read by streaming
    (memory stays flat: an 8-byte index per prompt); the pool must still be the first one."""
    import numpy as np

    src = cfg.prompts
    _same_pool(src, Path(cfg.out) / "pool.json")
    order = np.random.default_rng(cfg.seed).permutation(n)
    wanted = order[(t - 1) * src.per_iteration : t * src.per_iteration]
    if len(wanted) == 0:
        raise UserError(f"prompt pool {src.source} has {n} prompts: none left for iteration {t} "
                        f"({src.per_iteration} per iteration)")
    slot = {int(i): k for k, i in enumerate(wanted)}
    picked: list[dict | None] = [None] * len(wanted)
    for i, rec in enumerate(iter_records(src.source, Prompt, src.split)):
        if i in slot:
            picked[slot[i]] = {**rec.model_dump(exclude_none=True), "id": f"pool-{i}" if rec.id is None else rec.id}
    write_jsonl(path, picked)
    if len(wanted) < src.per_iteration:
        print(f"loop: iteration {t} gets only {len(wanted)} prompts (pool of {n})")


def _same_pool(src: PromptPoolConfig, record: Path) -> None:
    """The pool's identity (a file's sha256; a hub dataset's name, split and revision) as
    iteration 1 saw it: the slices are disjoint only within one pool."""
    from ..data.token_cache import data_identity

    now = data_identity(src.source, src.split)
    if not record.exists():
        write_json(record, now)
    elif read_json(record) != now:
        raise UserError(f"prompt pool {src.source} changed since the run's first iteration sliced it (other "
                        "contents): the iterations' slices are disjoint only within one pool; restore it, "
                        "or start a new run (another out=)")


def _generate_config(cfg: LoopConfig, policy: str, t: int, d: Path) -> GenerateConfig:
    return cfg.generate.model_copy(deep=True, update={
        "model": cfg.policy.model_copy(update={"path": policy}),
        "input": str(d / "prompts.jsonl"), "out": str(d / "rollouts.jsonl"),
        "sampling": cfg.generate.sampling.model_copy(update={"seed": cfg.seed * 1000 + t})})


def _pairs(cfg: LoopConfig, t: int, d: Path) -> None:
    select = cfg.select.model_copy(update={"seed": cfg.seed * 1000 + t})
    pairs, stats = build_pairs(iter_records(d / "scored.jsonl", Rollout), select)
    if not pairs:
        raise UserError(f"iteration {t}: no preference pairs to train on: the rewards of all "
                        f"{stats['prompts']} prompts tie (or differ by less than select.min_margin); check "
                        f"the judge on {d / 'scored.jsonl'}")
    point("pairs")
    write_jsonl(d / "pairs.jsonl", pairs)
    write_json(d / "pairs.stats.json", stats)


def _dpo_config(cfg: LoopConfig, policy: str, reference: str, d: Path) -> DPOConfig:
    dpo = cfg.dpo.model_copy(deep=True)  # the policy's identity, DPO's own dtype and attention
    dpo.model = dpo.model.model_copy(update={"path": policy, "tokenizer": cfg.policy.tokenizer,
                                             "trust_remote_code": cfg.policy.trust_remote_code})
    dpo.reference.path = reference
    dpo.data.train = str(d / "pairs.jsonl")
    dpo.train.output_dir = str(d / "dpo")
    dpo.train.seed = cfg.seed
    return dpo


def _evaluate(cfg: LoopConfig, t: int, policy: str, sft: str, d: Path) -> None:
    """``rlhf eval iteration`` on the stage's ranks (held-out prompts every ``eval.every``-th
    iteration, the SFT policy's and the last); with the vLLM backend the held-out prompts are
    sampled first by ``rlhf generate`` on the engines (token ids kept, for the KL)."""
    d.mkdir(parents=True, exist_ok=True)
    held_out = cfg.eval if t in (0, cfg.iterations) or t % cfg.eval.every == 0 else \
        cfg.eval.model_copy(update={"prompts": None})
    rollouts = None
    if held_out.prompts and cfg.generate.backend == "vllm":
        rollouts = d / "eval_rollouts.jsonl"
        gen = cfg.generate.model_copy(deep=True, update={
            "model": cfg.policy.model_copy(update={"path": policy}), "input": cfg.eval.prompts,
            "out": str(rollouts), "limit": cfg.eval.limit, "keep_token_ids": True,
            "sampling": cfg.eval.sampling.model_copy(update={"seed": cfg.seed})})
        _launch(cfg, "generate", gen, d / "eval_generate.yaml", 1, bool(cfg.launcher))
    sft_gold = d.parent / "iter_0" / "eval_gold.jsonl"  # (the SFT policy's, for the paired difference)
    _launch(cfg, "eval iteration", IterationEvalConfig(
        iteration=t, policy=cfg.policy.model_copy(update={"path": policy}), sft=sft, eval=held_out,
        annotator=cfg.annotate.annotator, seed=cfg.seed, rollouts=str(rollouts) if rollouts else None,
        iteration_dir=str(d) if t > 0 else None, out=str(d / "metrics.json"),
        gold_out=str(d / "eval_gold.jsonl") if held_out.prompts else None,
        baseline=str(sft_gold) if t > 0 and held_out.prompts and sft_gold.exists() else None,
        samples_out=str(d / "eval_samples.jsonl") if held_out.prompts and held_out.winrate else None,
        baseline_samples=str(sft_gold.with_name("eval_samples.jsonl")) if t > 0 and held_out.prompts and
        held_out.winrate else None), d / "eval.yaml")


# --------------------------------------------------------------------------- bookkeeping

SAMPLE_PAIRS = 8  # pairs of each iteration shown in the trackers


def _track(trackers: list, row: dict, pairs: Path | None) -> None:
    """An iteration's metrics (every number of its row: gold, judge reward, length, KL, win rate,
    pair statistics, stage seconds) at step = iteration, and a table of its first pairs."""
    if not trackers:
        return
    t = row["iteration"]
    numbers = {k: v for k, v in flatten(row).items() if isinstance(v, int | float) and not isinstance(v, bool)
               and k != "iteration"}
    sample = []
    if pairs is not None:
        for _, (_, p) in zip(range(SAMPLE_PAIRS), iter_rows(pairs), strict=False):
            sample.append([str(p["prompt"]), p["chosen"], p["rejected"], p["meta"].get("chosen_reward"),
                           p["meta"].get("rejected_reward")])
    columns = ["prompt", "chosen", "rejected", "chosen reward", "rejected reward"]
    for tracker in trackers:
        tracker.log(numbers, step=t)
        if not sample:
            continue
        if tracker.name == "wandb":
            tracker.log_table("pairs", columns=columns, data=sample, step=t)
        else:  # TensorBoard: the table as markdown text
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(x).replace("|", "\\|").replace("\n", " ") for x in r) + " |"
                      for r in sample]
            tracker.writer.add_text("pairs", "\n".join(lines), global_step=t)



def _refuse_owned_keys(cfg: LoopConfig) -> None:
    """Keys the loop sets itself (each iteration's policy, files and folders) are refused, not
    silently overwritten."""
    owned = [k for k, v in flatten(LoopConfig().model_dump(mode="json")).items() if v == SET]
    given = flatten(cfg.model_dump(mode="json"))
    set_by_user = [k for k in owned if given.get(k) != SET]
    if set_by_user:
        raise UserError(f"{', '.join(set_by_user)}: set by the loop for each iteration (the policy is policy.path, "
                        "the prompts prompts.source, the folders out); leave them unset")


def _check_config(cfg: LoopConfig, path: Path) -> None:
    """Save the run's config; on a re-run, refuse one that differs in what the run computes
    (every differing key is named) unless ``force``. How the run is launched (processes,
    launcher) and where its folder is (``out``: a moved run) may change; paths are compared
    normalised (``runs/x/`` is ``runs/x``)."""
    how = {"force", "processes", "launcher", "out"}
    new = cfg.model_dump(mode="json", exclude=how)
    if path.exists():
        old = yaml.safe_load(path.read_text()) or {}
        if not isinstance(old, dict) or not {"iterations", "policy", "prompts"} <= old.keys():
            raise UserError(f"{path.parent} is not a loop run directory (its config.yaml belongs to another "
                            "command); choose a new out=")
        diff = _diff({k: v for k, v in old.items() if k not in how}, new)
        if diff and not cfg.force:
            more = f" and {len(diff) - 10} more" if len(diff) > 10 else ""
            raise UserError(f"{path.parent} was started with another config ({len(diff)} keys differ: "
                            f"{', '.join(diff[:10])}{more}); use --force to continue anyway")
    save_config(cfg, path)


def _diff(a, b, prefix: str = "") -> list[str]:
    """Keys whose values differ (a key only one side has, from another version, is not compared)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return sorted(k for key in a.keys() & b.keys() for k in _diff(a.get(key), b.get(key), f"{prefix}{key}."))
    if isinstance(a, str) and isinstance(b, str) and "/" in a + b and os.path.normpath(a) == os.path.normpath(b):
        return []
    return [] if a == b else [prefix.rstrip(".")]


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _one_line(row: dict) -> str:
    return (f"iter {row['iteration']}: RM reward {_fmt(row.get('rm_reward'))}, gold "
            f"{_fmt(row.get('gold_reward'))}, length {_fmt(row.get('mean_tokens'), '.1f')} tokens, "
            f"KL {_fmt(row.get('kl'))}, pairs {row.get('pairs', '-')}"
            + (f", win rate against SFT {with_se(row, 'win_rate')} (length-controlled {with_se(row, 'lc_win_rate')})"
               if "win_rate" in row else ""))


def summary_table(rows: list[dict]) -> str:
    wr = any("win_rate" in r for r in rows)
    head = ("| iteration | RM reward | best-of-n RM | gold reward +- se | gold - SFT's +- se | accuracy "
            "| length (tokens) | EOS rate | KL to SFT | pairs |" + (" win rate | LC win rate |" if wr else "")
            + " generate s | annotate s | DPO s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s = r.get("seconds") or {}
        lines.append(
            f"| {r['iteration']} | {_fmt(r.get('rm_reward'))} | {_fmt(r.get('rm_best_of_n'))} | "
            f"{with_se(r, 'gold_reward')} | {with_se(r, 'gold_vs_baseline')} | {_fmt(r.get('accuracy'))} | {_fmt(r.get('mean_tokens'), '.1f')} | "
            f"{_fmt(r.get('eos_rate'))} | {_fmt(r.get('kl'))} | {r.get('pairs', '-')} | "
            + (f"{with_se(r, 'win_rate')} | {with_se(r, 'lc_win_rate')} | " if wr else "")
            + f"{_fmt(s.get('generate'), '.0f')} | {_fmt(s.get('annotate'), '.0f')} | {_fmt(s.get('dpo'), '.0f')} |")
    return "\n".join(lines) + "\n"
