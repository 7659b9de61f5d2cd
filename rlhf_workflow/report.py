"""``rlhf report RUN_DIR``: tables and plots of a demo or loop run, as Markdown and HTML.

Reads ``summary.json`` (written by ``rlhf demo`` or ``rlhf loop``) and writes
``report.md``, ``report.html`` and ``plots/*.png`` into the run directory. The
reproducibility manifests found in it (``manifest.json`` of the run and of its stages, see
:mod:`.manifest`) are shown too; a directory with a manifest but no summary (a training
stage's output) gets a report of its manifest alone.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from pydantic import Field

from .config import Config
from .errors import UserError
from .io import write_text


class ReportConfig(Config):
    run_dir: str = Field("runs/demo", description="a run directory of `rlhf demo` or `rlhf loop`")


def run_report(cfg: ReportConfig) -> Path:
    d = Path(cfg.run_dir)
    manifests = find_manifests(d)
    if not (d / "summary.json").exists():
        if not manifests:
            raise UserError(f"{d}: no summary.json and no manifest.json (is it a finished `rlhf demo` or "
                            "`rlhf loop` run, or a stage's output directory?)")
        md = "\n".join(["# Report", "", *manifest_markdown(d, manifests)]) + "\n"
        write_text(d / "report.md", md)
        write_text(d / "report.html", _html(md, d.name))
        print(f"report: {d / 'report.md'} and {d / 'report.html'} (manifest only: no summary.json)")
        return d / "report.md"
    summary = json.loads((d / "summary.json").read_text())
    if "iterations" in summary:  # a single loop run
        its = summary["iterations"]
        summary = {"runs": {"online": its}, "policies": {"sft": its[0]}, "reward_models": {}}
    plots = make_plots(summary, d / "plots")
    md = render_markdown(summary, plots)
    if manifests:
        md += "\n" + "\n".join(manifest_markdown(d, manifests)) + "\n"
    write_text(d / "report.md", md)
    write_text(d / "report.html", _html(md, d.name))
    print(f"report: {d / 'report.md'} and {d / 'report.html'} ({len(plots)} plots)")
    return d / "report.md"


# --------------------------------------------------------------------------- tables


def _f(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def with_se(row: dict, key: str) -> str:
    """``0.345 +- 0.017``: a figure and its standard error (clustered by prompt), if it has one."""
    if row.get(key) is None:
        return "-"
    return _f(row[key]) + (f" +- {row[key + '_se']:.3f}" if row.get(key + "_se") is not None else "")


def policy_rows(summary: dict) -> list[tuple[str, dict]]:
    """(name, metrics) of every evaluated policy: fixed ones, then each run's iterations."""
    rows = list(summary.get("policies", {}).items())
    for run, its in summary.get("runs", {}).items():
        rows += [(f"{run} iter {r['iteration']}", r) for r in its if r["iteration"] > 0]
    return rows


def render_markdown(summary: dict, plots: list[str]) -> str:
    out = ["# Report", ""]
    if summary.get("claims"):
        out += ["## The paper's claims at this scale", ""]
        out += [f"- {c}" for c in summary["claims"]] + [""]
    out += ["## Policies (held-out prompts)", "",
            "| policy | gold reward +- se | gold - SFT's +- se | accuracy | RM reward | length (tokens) | EOS rate "
            "| KL to SFT |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in policy_rows(summary):
        out.append(f"| {name} | {with_se(r, 'gold_reward')} | {with_se(r, 'gold_vs_baseline')} | {_f(r.get('accuracy'))} | "
                   f"{_f(r.get('rm_reward'))} | {_f(r.get('mean_tokens'), '.1f')} | "
                   f"{_f(r.get('eos_rate'))} | {_f(r.get('kl'))} |")
    for run, its in summary.get("runs", {}).items():
        out += ["", f"## Run `{run}`", "",
                "| iteration | pairs | rollout judge reward | best-of-n judge | gold: judge's pick | "
                "gold: best of n | generate s | annotate s | DPO s |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in its:
            s = r.get("seconds") or {}
            out.append(f"| {r['iteration']} | {r.get('pairs', '-')} | {_f(r.get('rollout_rm_reward'))} | "
                       f"{_f(r.get('rollout_best_of_n'))} | {_f(r.get('chosen_gold'))} | {_f(r.get('best_gold'))} | "
                       f"{_f(s.get('generate'), '.0f')} | "
                       f"{_f(s.get('annotate'), '.0f')} | {_f(s.get('dpo'), '.0f')} |")
    rms = summary.get("reward_models", {})
    if rms:
        subsets = sorted({s for r in rms.values() for s in r.get("per_subset", {})})
        out += ["", "## Reward models (held-out preference pairs)", "",
                "| model | " + " | ".join(subsets) + " | overall |", "|---" * (len(subsets) + 2) + "|"]
        for name, r in rms.items():
            accs = [_f(r["per_subset"].get(s, {}).get("accuracy")) for s in subsets]
            out.append(f"| {name} | " + " | ".join(accs) + f" | {_f(r.get('accuracy'))} |")
    skills = summary.get("judge_skills") or {}
    if skills:
        cols = sorted({s for r in skills.values() for s in r})
        out += ["", "Against gold, per skill (a skill near 0.5 is one whose answers the judge does not check):", "",
                "| judge | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        out += [f"| {name} | " + " | ".join(_f(r.get(s)) for s in cols) + " |" for name, r in skills.items()]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in plots]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- manifests


def find_manifests(d: Path) -> list[Path]:
    """``manifest.json`` and ``*.manifest.json`` files under ``d`` (not in checkpoints), the
    shallowest first."""
    if not d.is_dir():
        return []
    found = [p for p in d.rglob("*manifest.json")
             if p.name == "manifest.json" or p.name.endswith(".manifest.json")]
    found = [p for p in found if "checkpoints" not in p.relative_to(d).parts]
    return sorted(found, key=lambda p: (len(p.relative_to(d).parts), str(p)))


def _short(h: str | None, n: int = 12) -> str:
    return "-" if not h else f"`{h[:n]}`"


def _code(m: dict) -> str:
    g = m.get("git")
    version = m.get("versions", {}).get("rlhf-workflow", "?")
    if not g:
        return f"rlhf-workflow {version}, not run from a git checkout"
    dirty = (f" with uncommitted changes (diff sha256 {_short(g.get('diff_sha256'))}"
             + (f", untracked: {', '.join(g['untracked'])}" if g.get("untracked") else "") + ")"
             if g.get("dirty") else "")
    return f"rlhf-workflow {version}, git {_short(g['commit'], 10)}{dirty}"


def _gpus(hw: dict) -> str:
    gpus = hw.get("gpus") or []
    if not gpus:
        return "none"
    names = {}
    for g in gpus:
        key = f"{g['name']} ({g['memory_gib']} GiB)"
        names[key] = names.get(key, 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in names.items()) + (f", CUDA {hw['cuda']}" if hw.get("cuda") else "")


def manifest_markdown(d: Path, paths: list[Path]) -> list[str]:
    """The run's manifest in full (the shallowest one), the others one row each."""
    main = json.loads(paths[0].read_text())
    v = main.get("versions", {})
    hw = main.get("hardware", {})
    out = ["## Reproducibility", "", f"From `{paths[0].relative_to(d)}`, written {main.get('created')} by "
           f"`{main.get('command')}`:", "",
           f"- code: {_code(main)}",
           "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "rlhf-workflow"),
           f"- hardware: {hw.get('cpu_count')} CPUs ({hw.get('cpus_usable', '?')} usable, "
           f"{hw.get('torch_threads', '?')} torch threads), {hw.get('memory_gib', '?')} GiB, {hw.get('system')}; "
           f"GPUs: {_gpus(hw)}",
           "- seeds: " + (", ".join(f"{k}={val}" for k, val in main.get("seeds", {}).items()) or "none"),
           f"- config sha256: {_short(main.get('config_sha256'))}"]
    if main.get("env"):
        out.append("- environment: " + ", ".join(f"{k}={val}" for k, val in main["env"].items()))
    history = paths[0].parent / "manifest.history.jsonl"
    if history.exists():
        old = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
        keys = sorted({k for m in old for k in ("versions", "git", "hardware", "models", "inputs")
                       if m.get(k) != main.get(k)})
        out.append(f"- earlier starts in another setting: {len(old)} (`{history.relative_to(d)}`), "
                   f"differing in: {', '.join(keys) or '-'}")
    if main.get("inputs"):
        out += ["", "| input | bytes | sha256 |", "|---|---|---|"]
        for i in main["inputs"]:
            if "files" in i:
                for f in i["files"]:
                    out.append(f"| {i['path']}/{f['path']} | {f['bytes']} | {_short(f['sha256'])} |")
            else:
                status = "hub" if i.get("hub") else "missing" if i.get("missing") else _short(i.get("sha256"))
                out.append(f"| {i['path']} | {i.get('bytes', '-')} | {status} |")
    if main.get("models"):
        out += ["", "| model | path | config.json sha256 | weights | tokenizer.json sha256 |", "|---|---|---|---|---|"]
        for name, m in main["models"].items():
            weights = ", ".join(f"{w} ({b / 2**20:.1f} MiB)" for w, b in m.get("weights", [])) or (
                "hub" if m.get("hub") else "-")
            tok = (m.get("tokenizer") or {}).get("tokenizer.json")
            out.append(f"| {name} | {m['path']} | {_short(m.get('config_sha256'))} | {weights} | {_short(tok)} |")
    if main.get("hub"):
        out += ["", "| config key | hub name |", "|---|---|"] + [f"| {k} | {n} |" for k, n in main["hub"].items()]
    if len(paths) > 1:
        out += ["", "### Stages", "", "| manifest | written | git | torch | transformers | GPUs | config sha256 "
                "| differs from the run's |", "|---|---|---|---|---|---|---|---|"]
        for p in paths[1:]:
            m = json.loads(p.read_text())
            g = m.get("git") or {}
            differs = [k for k in ("versions", "git", "hardware") if m.get(k) != main.get(k)]
            out.append(f"| {p.relative_to(d)} | {m.get('created')} | {_short(g.get('commit'), 10)}"
                       f"{' (dirty)' if g.get('dirty') else ''} | {m.get('versions', {}).get('torch')} | "
                       f"{m.get('versions', {}).get('transformers')} | {_gpus(m.get('hardware', {}))} | "
                       f"{_short(m.get('config_sha256'))} | {', '.join(differs) or '-'} |")
    return out


def _html(md: str, title: str) -> str:
    """A dependency-free rendering of our own Markdown subset (headings, lists, tables, images)."""
    body, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            body.append(("<table>" if not in_table else "") + "<tr>" +
                        "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            in_table = True
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            body.append(f'<img src="{html.escape(src)}" style="max-width:640px">')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:900px;margin:auto}td,th{padding:2px 8px;border:1px solid #ccc}table{border-collapse:collapse}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


# --------------------------------------------------------------------------- plots


def make_plots(summary: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    runs = summary.get("runs", {})
    fixed = summary.get("policies", {})
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        made.append(name)

    for key, label, name in [("gold_reward", "gold reward", "gold_reward.png"),
                             ("rm_reward", "reward-model reward", "rm_reward.png"),
                             ("mean_tokens", "mean response length (tokens)", "length.png")]:
        if not any(r.get(key) is not None for its in runs.values() for r in its):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for run, its in runs.items():
            ax.plot([r["iteration"] for r in its], [r.get(key) for r in its], marker="o", label=run)
        for i, (pname, m) in enumerate(fixed.items()):
            if m.get(key) is not None and pname != "sft":
                ax.axhline(m[key], ls="--", color=f"C{len(runs) + i}", label=pname)
        ax.set_xlabel("iteration (0 = SFT)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        save(fig, name)
    if any(r.get("kl") is not None and r.get("gold_reward") is not None for its in runs.values() for r in its):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for run, its in runs.items():
            ax.plot([r.get("kl") for r in its], [r.get("gold_reward") for r in its], marker="o", label=run)
        for pname, m in fixed.items():
            if m.get("kl") is not None and m.get("gold_reward") is not None and pname != "sft":
                ax.scatter([m["kl"]], [m["gold_reward"]], marker="s", label=pname)
        ax.set_xlabel("KL(pi || SFT), nats per response")
        ax.set_ylabel("gold reward")
        ax.legend(fontsize=8)
        save(fig, "kl_vs_gold.png")
    judged = {run: pts for run, its in runs.items()
              if len(pts := [r for r in its if r.get("rm_reward") is not None and r.get("gold_reward") is not None]) > 1}
    if judged:
        fig, ax = plt.subplots(figsize=(6, 3.6))  # over-optimisation: the judge's reward against gold
        for run, pts in judged.items():
            ax.plot([r["rm_reward"] for r in pts], [r["gold_reward"] for r in pts], marker="o", label=run)
            for r in pts:
                ax.annotate(str(r["iteration"]), (r["rm_reward"], r["gold_reward"]), fontsize=7)
        ax.set_xlabel("judge's reward of the policy's responses (numbers: iteration)")
        ax.set_ylabel("gold reward")
        ax.legend(fontsize=8)
        save(fig, "judge_vs_gold.png")
    rms = summary.get("reward_models", {})
    if rms:
        subsets = sorted({s for r in rms.values() for s in r.get("per_subset", {})})
        fig, ax = plt.subplots(figsize=(6, 3.6))
        width = 0.8 / len(rms)
        for k, (name, r) in enumerate(rms.items()):
            xs = [i + k * width for i in range(len(subsets))]
            ax.bar(xs, [r["per_subset"].get(s, {}).get("accuracy", 0) for s in subsets], width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(subsets))], subsets)
        ax.set_ylim(0, 1)
        ax.set_ylabel("held-out pair accuracy")
        ax.legend(fontsize=8)
        save(fig, "rm_accuracy.png")
    return made
