"""What the demo's runs show: per-run headline numbers, the paper's claims read from them, the
terminal summary, and the mean and spread over seeds per regime."""

from __future__ import annotations

import statistics
from pathlib import Path

from .data.readers import iter_rows


def mean_seconds(its: list[dict], stage: str) -> float | None:
    xs = [r["seconds"][stage] for r in its if (r.get("seconds") or {}).get(stage) is not None]
    return sum(xs) / len(xs) if xs else None


def annotator_agreement(path: Path) -> dict:
    """How often the annotator's label agrees with the gold order, per subset: the accuracy a
    judge equal to gold would get against the labels."""
    hits: dict[str, list[bool]] = {}
    for _, r in iter_rows(path):
        hits.setdefault(r.get("subset") or "all", []).append(r["meta"]["gold_chosen"] > r["meta"]["gold_rejected"])
    per = {s: {"accuracy": sum(h) / len(h), "n": len(h)} for s, h in sorted(hits.items())}
    flat = [x for h in hits.values() for x in h]
    return {"per_subset": per, "accuracy": sum(flat) / len(flat)}


def headline(summary: dict) -> dict:
    runs, pol = summary["runs"], summary["policies"]
    last = {name: its[-1] for name, its in runs.items()}
    lp = next((v for k, v in last.items() if k.startswith("online_length_penalty")), {})
    online, off = last["online"], pol.get("offline_dpo") or {}
    h = {"gold_sft": pol["sft"].get("gold_reward"), "gold_offline": off.get("gold_reward")}
    h.update({f"gold_online_iter{r['iteration']}": r.get("gold_reward") for r in runs["online"][1:]})
    h.update(gold_online=online.get("gold_reward"), gold_online_lp=lp.get("gold_reward"),
             gold_online_bt_judge=last.get("online_bt_judge", {}).get("gold_reward"),
             gold_online_gold_judge=last.get("online_gold_judge", {}).get("gold_reward"),
             gold_online_pm_judge=last.get("online_pm_judge", {}).get("gold_reward"),
             accuracy_sft=pol["sft"].get("accuracy"), accuracy_offline=off.get("accuracy"),
             accuracy_online=online.get("accuracy"), kl_offline=off.get("kl"), kl_online=online.get("kl"),
             kl_online_lp=lp.get("kl"), rm_sft=pol["sft"].get("rm_reward"), rm_online=online.get("rm_reward"),
             tokens_online=online.get("mean_tokens"), tokens_online_lp=lp.get("mean_tokens"),
             chars_sft=pol["sft"].get("mean_chars"), chars_online=online.get("mean_chars"),
             chars_online_lp=lp.get("mean_chars"))
    # standard errors (clustered by prompt) and differences paired by prompt: to SFT, online to offline
    h.update(gold_sft_se=pol["sft"].get("gold_reward_se"), gold_online_se=online.get("gold_reward_se"),
             online_minus_sft=online.get("gold_vs_baseline"), online_minus_sft_se=online.get("gold_vs_baseline_se"),
             offline_minus_sft=off.get("gold_vs_baseline"), offline_minus_sft_se=off.get("gold_vs_baseline_se"),
             bt_judge_minus_sft=last.get("online_bt_judge", {}).get("gold_vs_baseline"),
             bt_judge_minus_sft_se=last.get("online_bt_judge", {}).get("gold_vs_baseline_se"))
    paired = summary.get("online_vs_offline") or {}
    h.update(online_minus_offline=paired.get("diff"), online_minus_offline_se=paired.get("se"))
    picks = [r for r in runs["online"][1:] if r.get("chosen_gold") is not None]
    if picks:
        h["pick_gold_online"] = statistics.mean(r["chosen_gold"] for r in picks)
        h["best_gold_online"] = statistics.mean(r["best_gold"] for r in picks)
        h["mean_gold_online_rollouts"] = statistics.mean(r["rollout_gold"] for r in picks)
    for name, r in summary["reward_models"].items():
        key = name.replace(" (ceiling)", "").replace(" vs ", "_").lower()
        h.update({f"{key}_{s}": v["accuracy"] for s, v in r["per_subset"].items()})
    cost = summary.get("judge_cost") or {}
    secs = cost.get("annotate_seconds_per_iteration") or {}
    h.update(pm_comparisons_per_prompt=cost.get("comparisons_per_prompt"),
             annotate_s_bt=secs.get("online"), annotate_s_pm=secs.get("online_pm_judge"))
    return h


def claims(h: dict, judge: str = "BT") -> list[str]:
    """The paper's claims read from a run's headline; ``judge``: the name of the online loop's judge."""
    out = []

    def yes(ok: bool) -> str:
        return "reproduces" if ok else "does NOT reproduce"

    def have(*keys: str) -> bool:
        return all(h.get(k) is not None for k in keys)

    def gap(key: str) -> str:
        return f"{h[key]:+.3f} +- {h[key + '_se']:.3f}"

    if have("gold_sft", "gold_offline", "gold_online", "online_minus_offline_se", "offline_minus_sft_se"):
        gaps = [(h[k], h[k + "_se"]) for k in ("online_minus_offline", "offline_minus_sft")]
        verdict = ("reproduces, each gap over two standard errors" if all(d > 2 * se for d, se in gaps) else
                   "holds in the mean, within two standard errors" if all(d > 0 for d, _ in gaps) else
                   "does NOT reproduce")
        out.append(f"online > offline > SFT on gold reward ({judge} judge): {verdict} (SFT {h['gold_sft']:.3f}, "
                   f"offline DPO {h['gold_offline']:.3f}, online iterative DPO {h['gold_online']:.3f}; paired by "
                   f"prompt: online - offline {gap('online_minus_offline')}, offline - SFT {gap('offline_minus_sft')})")
    if have("chars_online", "chars_online_lp", "gold_online_lp"):
        cut = 1 - h["chars_online_lp"] / h["chars_online"]
        out.append(f"with a length penalty: length {-cut:+.0%} "
                   f"({h['chars_online']:.0f} -> {h['chars_online_lp']:.0f} chars), gold "
                   f"{h['gold_online']:.3f} -> {h['gold_online_lp']:.3f}")
    if have("gold_sft", "gold_online_bt_judge", "bt_judge_minus_sft_se", "online_minus_sft_se"):
        out.append(f"what a weak judge does: the same loop with the BT reward model as the judge ends at gold "
                   f"{h['gold_online_bt_judge']:.3f}, {gap('bt_judge_minus_sft')} against SFT, where the {judge} "
                   f"judge's ends at {h['gold_online']:.3f}, {gap('online_minus_sft')} (paired by prompt)")
    if have("gold_sft", "gold_online_gold_judge"):
        out.append(f"with the gold reward as the judge, online iterative DPO raises the gold reward: "
                   f"{yes(h['gold_online_gold_judge'] > h['gold_sft'])} (SFT {h['gold_sft']:.3f} -> "
                   f"{h['gold_online_gold_judge']:.3f})")
    if have("bt_gold_reasoning", "pm_gold_reasoning"):
        out.append(f"the PM is the better judge on reasoning (against gold): "
                   f"{yes(h['pm_gold_reasoning'] > h['bt_gold_reasoning'])} (reasoning: BT "
                   f"{h['bt_gold_reasoning']:.3f}, PM {h['pm_gold_reasoning']:.3f}; chat: BT "
                   f"{h['bt_gold_chat']:.3f}, PM {h['pm_gold_chat']:.3f})")
    if have("gold_online_pm_judge", "gold_sft"):
        cost = (f"; {h['pm_comparisons_per_prompt']} comparisons per prompt, annotation "
                f"{h['annotate_s_pm']:.0f}s per iteration against {h['annotate_s_bt']:.0f}s for the {judge} judge"
                if have("pm_comparisons_per_prompt", "annotate_s_pm", "annotate_s_bt") else "")
        out.append(f"online iterative DPO with the PM tournament as the judge: gold {h['gold_sft']:.3f} -> "
                   f"{h['gold_online_pm_judge']:.3f}{cost}")
    if have("pick_gold_online", "best_gold_online"):
        out.append(f"winner's curse: the {judge} judge's chosen response has gold reward {h['pick_gold_online']:.3f} "
                   f"where the best of the n has {h['best_gold_online']:.3f} and their mean "
                   f"{h['mean_gold_online_rollouts']:.3f} (training rollouts, mean over iterations)")
    return out


def screen(summary: dict) -> str:
    h = summary["headline"]
    rows = [("SFT", h["gold_sft"], summary["policies"]["sft"].get("mean_tokens")),
            ("offline DPO", h["gold_offline"], (summary["policies"].get("offline_dpo") or {}).get("mean_tokens")),
            (f"online, {summary.get('judge', 'bt').upper()} judge", h["gold_online"], h["tokens_online"]),
            ("online + length penalty", h["gold_online_lp"], h["tokens_online_lp"]),
            ("online, BT judge", h.get("gold_online_bt_judge"), None),
            ("online, gold judge", h.get("gold_online_gold_judge"), None),
            ("online, PM judge", h.get("gold_online_pm_judge"), None)]
    lines = [f"regime: {summary['regime']}", f"{'policy':<26} {'gold reward':>11} {'tokens':>7}"]
    lines += [f"{n:<26} {'-' if g is None else f'{g:.3f}':>11} {'-' if t is None else f'{t:.1f}':>7}"
              for n, g, t in rows if g is not None]
    hint = (["", "the same with a judge that checks answers against the question (the paper's premise of a strong "
             "judge): rlhf demo judge=dpo, the default"] if summary.get("judge") == "bt" else [])
    return "\n".join(lines + [""] + [f"- {c}" for c in summary["claims"]] + hint)


def aggregate(results: dict[str, dict[int, dict]], seeds: list[int]) -> tuple[dict, list[str]]:
    """Mean, sd and values of every headline quantity per regime, and a Markdown table of them."""
    regimes = list(results)
    keys = list(dict.fromkeys(k for per_seed in results.values() for h in per_seed.values() for k in h))
    agg: dict[str, dict[str, dict]] = {}
    lines = ["| quantity | " + " | ".join(f"{r}: mean +- sd (seeds {', '.join(map(str, seeds))})"
                                         for r in regimes) + " |", "|---" * (len(regimes) + 1) + "|"]
    for k in keys:
        cells = []
        for regime in regimes:
            vals = [h[k] for h in results[regime].values() if h.get(k) is not None]
            if not vals:
                cells.append("-")
                continue
            mean, sd = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
            agg.setdefault(regime, {})[k] = {"mean": mean, "sd": sd, "values": vals}
            cells.append(f"{mean:.3f} +- {sd:.3f} ({', '.join(f'{v:.3f}' for v in vals)})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return agg, lines
