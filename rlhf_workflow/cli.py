"""``rlhf <command> [--config FILE.yaml] [key=value ...]``: one entry point for every stage.

Each command is a config class plus a function taking it. Options come from the YAML file
and ``key=value`` (or ``--key value``) overrides; ``rlhf <command> --help`` lists them all.
Mistakes a user can make end as one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Command:
    config: str  # "module:Class", imported lazily so `rlhf --help` stays fast
    run: str  # "module:function"
    summary: str
    positional: str | None = None  # the option a bare word sets (`rlhf report RUN_DIR`)


COMMANDS: dict[str, Command] = {
    "demo": Command("demo:DemoConfig", "demo:run_demo",
                    "the workflow on the built-in sandbox, end to end, resumable"),
    "init-model": Command("models.tiny:InitModelConfig", "models.tiny:init_model",
                          "build a tiny HF model + tokenizer from a config (tests, demo)"),
    "export-model": Command("models.export:ExportModelConfig", "models.export:export_model",
                            "write a model (e.g. a GGUF file, dequantized) as a safetensors HF folder"),
    "sandbox make-data": Command("sandbox.generate:MakeDataConfig", "sandbox.generate:make_data",
                                 "write the sandbox prompts, SFT data and preference pairs"),
    "sft": Command("training.sft:SFTConfig", "training.sft:run_sft",
                   "supervised fine-tuning on chat data (assistant tokens only)"),
    "rm train": Command("reward.bt:RMConfig", "reward.bt:run_rm_train",
                        "train a Bradley-Terry reward model on preference pairs"),
    "rm eval": Command("evaluation.judges:RMEvalConfig", "evaluation.judges:run_rm_eval",
                       "RewardBench-style accuracy of a reward model on a pair file"),
    "pm train": Command("reward.pm:PMConfig", "reward.pm:run_pm_train",
                        "train a pairwise preference model (emits A or B)"),
    "pm eval": Command("evaluation.judges:PMEvalConfig", "evaluation.judges:run_pm_eval",
                       "RewardBench-style accuracy of a preference model on a pair file"),
    "dpo": Command("training.dpo:DPOConfig", "training.dpo:run_dpo",
                   "DPO (and IPO, hinge, RPO, SimPO) on preference pairs"),
    "generate": Command("online.generate:GenerateConfig", "online.generate:run_generate",
                        "sample n responses per prompt (transformers or vLLM), resumable"),
    "annotate": Command("online.annotate:AnnotateConfig", "online.annotate:run_annotate",
                        "reward every response: a BT model, DPO implicit reward, PM, reward function, or a sum"),
    "pairs": Command("online.pairs:PairsConfig", "online.pairs:run_pairs",
                     "one preference pair per prompt from scored rollouts (max_min, ...)"),
    "loop": Command("online.loop:LoopConfig", "online.loop:run_loop",
                    "online iterative DPO: generate, annotate, pairs, DPO, evaluate; resumable"),
    "check": Command("online.loop:LoopConfig", "checks:run_check",
                     "check a loop config's policy, reference and judge (BOS, stop tokens, pad, templates, lengths)"),
    "report": Command("report:ReportConfig", "report:run_report",
                      "report.md/.html and plots of a demo or loop run directory", positional="run_dir"),
    "eval policy": Command("evaluation.policy:EvalPolicyConfig", "evaluation.policy:run_eval_policy",
                           "sample a policy on sandbox prompts and report the gold reward"),
    "eval winrate": Command("evaluation.winrate:WinRateConfig", "evaluation.winrate:run_eval_winrate",
                            "a policy's win rate against a baseline under a judge, raw and length-controlled"),
    "eval iteration": Command("evaluation.iteration:IterationEvalConfig", "evaluation.iteration:run_iteration_eval",
                              "evaluate one policy of the loop (held-out samples, KL, judge and gold rewards)"),
}


def _import(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(f"rlhf_workflow.{module}"), name)


def _options_help(config_cls) -> str:
    from .config import describe_options

    rows = describe_options(config_cls)
    width = max(len(k) for k, _, _ in rows)
    lines = ["options (key=value, --key value, or in the YAML file; defaults shown):"]
    for key, default, desc in rows:
        lines.append(f"  {key:<{width}}  {desc} [default: {default}]")
    return "\n".join(lines)


def _top_help() -> str:
    lines = ["usage: rlhf <command> [--config FILE.yaml] [key=value ...]", "",
             "The online iterative RLHF workflow: SFT, reward models, iterative DPO.", "",
             "commands:"]
    lines += [f"  {n:<18} {c.summary}" for n, c in COMMANDS.items()]
    lines += ["", "run `rlhf <command> --help` for its options; `rlhf --version` for the version."]
    return "\n".join(lines)


def _no_command(argv: list[str]) -> int:
    if argv[:1] == ["--version"]:
        from . import __version__

        print(f"rlhf-workflow {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0
    group = [n for n in COMMANDS if n.split()[0] == argv[0]]
    if group and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        print(f"rlhf {argv[0]} commands:")
        print("\n".join(f"  {n:<18} {COMMANDS[n].summary}" for n in group))
        return 0
    print(f"error: unknown command {' '.join(argv[:2])!r}; commands: {', '.join(COMMANDS)}",
          file=sys.stderr)
    return 2


def _command_parser(name: str, cmd: Command, want_help: bool) -> argparse.ArgumentParser:
    epilog = _options_help(_import(cmd.config)) if want_help else None
    p = argparse.ArgumentParser(
        prog=f"rlhf {name}", description=cmd.summary, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with options (overrides on the command line win)")
    p.add_argument("overrides", nargs="*", help="key=value options, e.g. optim.lr=1e-5"
                   + (f" (a bare word sets {cmd.positional})" if cmd.positional else ""))
    return p


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    for words in (2, 1):
        name = " ".join(argv[:words])
        if name in COMMANDS:
            return name, argv[words:]
    return None, argv


ALIASES = {"in": "input"}  # `--in FILE` (a Python keyword) sets the `input` option


def _flags_to_overrides(args: list[str]) -> list[str]:
    """Turn ``--key value`` and ``--key=value`` into ``key=value`` (``--config`` stays)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and a not in ("--config", "--help") and not a.startswith("--config="):
            name, eq, value = a[2:].partition("=")
            name = ALIASES.get(name, name.replace("-", "_"))
            key = f"{name}={value}" if eq else name
            if "=" in key:
                out.append(key)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out.append(f"{key}={args[i + 1]}")
                i += 1
            else:
                out.append(f"{key}=true")
        else:
            out.append(a)
        i += 1
    return out


def _leave_process_group() -> None:
    """A rank that exits still in its process group can abort at interpreter shutdown: leave it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _terminate(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name, rest = _split_command(argv)
    if name is None:
        return _no_command(argv)
    cmd = COMMANDS[name]
    signal.signal(signal.SIGTERM, _terminate)  # a scheduler's pre-emption stops like Ctrl-C
    want_help = "-h" in rest or "--help" in rest
    args = _command_parser(name, cmd, want_help).parse_intermixed_args(_flags_to_overrides(rest))
    bare = [i for i, o in enumerate(args.overrides) if "=" not in o]
    if cmd.positional and len(bare) == 1:
        args.overrides[bare[0]] = f"{cmd.positional}={args.overrides[bare[0]]}"
    try:
        from .config import load_config

        cfg = load_config(_import(cmd.config), args.config, args.overrides)
        _import(cmd.run)(cfg)
        _leave_process_group()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted{f' ({e})' if str(e) else ''}; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
