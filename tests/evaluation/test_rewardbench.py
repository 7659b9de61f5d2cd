"""RewardBench v1 and v2 scoring: hand-computed values, and parity with the official
``rewardbench`` package (0.1.4) on hand-made files and on trained judges.

The official functions are loaded from the installed package's files with its heavy imports
(fastchat, the model registry) stubbed; the parity tests skip when the package is absent
(CI installs it with ``pip install --no-deps rewardbench==0.1.4``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.data.readers import read_pairs
from rlhf_workflow.errors import UserError
from rlhf_workflow.evaluation.judges import detect_format, format_table, read_best_of_n
from rlhf_workflow.evaluation.rewardbench import (
    EXAMPLE_COUNTS,
    SECTIONS,
    Scored,
    best_of_n_credit,
    rewardbench2_scores,
    rewardbench_scores,
    subset_accuracy,
    summarize,
    ties_score,
)

# --------------------------------------------------------------------------- the official code


def _exec_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def official():
    """``constants``, ``utils`` and the leaderboard's ``get_benchmark_results`` of rewardbench
    0.1.4, loaded by file path (its package ``__init__`` imports fastchat and every model)."""
    found = importlib.util.find_spec("rewardbench")
    if found is None:
        pytest.skip("rewardbench 0.1.4 is not installed (pip install --no-deps rewardbench==0.1.4)")
    root = Path(found.submodule_search_locations[0])
    pkg = types.ModuleType("rewardbench")
    pkg.__path__ = [str(root)]
    registry = types.ModuleType("rewardbench.models")
    registry.REWARD_MODEL_CONFIG = {}
    conversation = types.ModuleType("fastchat.conversation")
    conversation.Conversation = object
    stubs = {"rewardbench": pkg, "rewardbench.models": registry,
             "fastchat": types.ModuleType("fastchat"), "fastchat.conversation": conversation}
    with pytest.MonkeyPatch.context() as mp:
        for name, module in stubs.items():
            mp.setitem(sys.modules, name, module)
        constants = _exec_file(root / "constants.py", "rewardbench.constants")
        mp.setitem(sys.modules, "rewardbench.constants", constants)
        utils = _exec_file(root / "utils.py", "rewardbench.utils")
        board = _exec_file(root.parent / "analysis" / "get_benchmark_results.py", "_rb_benchmark_results")
    return types.SimpleNamespace(constants=constants, utils=utils, board=board)


def official_v1(official, subsets, chosen, rejected, prior=None):
    """Per-subset accuracy as scripts/run_rm.py computes it (1 if chosen > rejected else 0),
    the section scores of ``calculate_scores_per_section``, and the leaderboard's overall of
    ``get_average_over_rewardbench`` when every section is present (``prior``: the prior
    sets' accuracies, or None when the model has no prior-set results)."""
    import pandas as pd

    wins: dict[str, list[int]] = {}
    for s, c, r in zip(subsets, chosen, rejected, strict=True):
        wins.setdefault(s, []).append(1 if c > r else 0)
    grouped = {s: sum(v) / len(v) for s, v in wins.items()}
    core = {s: a for s, a in grouped.items() if s in EXAMPLE_COUNTS}
    sections = official.utils.calculate_scores_per_section(
        official.constants.EXAMPLE_COUNTS, official.constants.SUBSET_MAPPING, core)
    overall = None
    if all(any(m in core for m in members) for members in SECTIONS.values()):
        df = pd.DataFrame([{"model": "m", "model_type": "Seq. Classifier", **core}])
        cols = ["anthropic_helpful", "anthropic_hhh", "shp", "summarize"]
        prefs = pd.DataFrame([{"model": "m" if prior else "other",
                               **{c: (prior or {}).get(c, np.nan) for c in cols}}])
        overall = float(official.board.get_average_over_rewardbench(df, prefs)["average"].iloc[0])
    return grouped, sections, overall


def official_v2(official, records: list[dict]):
    """Per-subset scores as scripts/run_v2.py computes them: ``reroll_and_score_dataset`` on
    the unrolled responses, the Ties subset by ``process_single_model``."""
    from datasets import Dataset

    rows = [{"id": r["id"], "subset": r["subset"], "text": t, "scores": s}
            for r in records for t, s in zip(r["chosen"] + r["rejected"], r["scores"], strict=True)]
    rolled = official.utils.reroll_and_score_dataset(
        Dataset.from_list(rows), [len(r["scores"]) for r in records], cols_to_combine=["text", "scores"])
    rolled = rolled.add_column("num_correct", [r["num_correct"] for r in records])
    out = {}
    for subset in sorted({r["subset"] for r in records}):
        part = rolled.filter(lambda x, s=subset: x["subset"] == s)
        if subset.lower() == "ties":
            out[subset] = float(official.utils.process_single_model(part)[1])
        else:
            out[subset] = sum(part["results"]) / len(part)
    return out


# --------------------------------------------------------------------------- hand-made files

# (subset, wins, losses, ties): unequal counts, ties, a prior set left out (anthropic_hhh)
V1_PLAN = [
    ("alpacaeval-easy", 3, 1, 0), ("mt-bench-med", 1, 0, 1),
    ("llmbar-natural", 2, 3, 0), ("mt-bench-hard", 1, 0, 1),
    ("xstest-should-refuse", 1, 1, 0), ("xstest-should-respond", 5, 0, 0), ("donotanswer", 0, 2, 0),
    ("math-prm", 1, 3, 0), ("hep-go", 2, 0, 0), ("hep-rust", 0, 1, 1),
    ("anthropic_helpful", 2, 1, 0), ("shp", 1, 0, 1), ("summarize", 0, 1, 0),
]


def v1_file(path: Path, drop: tuple[str, ...] = ()) -> Path:
    """Pairs whose texts carry the judge's scores ("score 3"), written as a JSONL file."""
    lines, k = [], 0
    for subset, wins, losses, ties in V1_PLAN:
        if subset in drop:
            continue
        for c, r in [(2.0, 1.0)] * wins + [(1.0, 2.0)] * losses + [(1.5, 1.5)] * ties:
            k += 1
            lines.append({"prompt": f"question {k}", "chosen": f"yes {k}", "rejected": f"no {k}",
                          "subset": subset, "chosen_score": c + k, "rejected_score": r + k})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _v1_scores(path: Path):
    rows, _ = read_pairs(str(path))
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.pair.subset for r in rows] == [x["subset"] for x in raw]
    return ([r.pair.subset for r in rows], [x["chosen_score"] for x in raw],
            [x["rejected_score"] for x in raw])


# v2 prompts with the judge's scores, correct responses first
V2_RECORDS = [
    {"id": "0", "subset": "Factuality", "scores": [3.0, 1.0, 2.0, 0.5]},  # chosen on top: 1
    {"id": "1", "subset": "Factuality", "scores": [1.0, 3.0, 2.0, 0.5]},  # 0
    {"id": "2", "subset": "Factuality", "scores": [3.0, 3.0, 2.0, 0.5]},  # two at the top: 1/2
    {"id": "3", "subset": "Math", "scores": [2.0, 2.0, 2.0, 1.0]},  # three at the top: 1/3
    {"id": "4", "subset": "Math", "scores": [5.0, 4.0, 3.0, 2.0]},  # 1
    {"id": "5", "subset": "Focus", "scores": [2.0, 2.0, 3.0, 1.0]},  # tied, not top: 0
    {"id": "ref:0", "subset": "Ties", "num_correct": 1, "scores": [4.0, 1.0, 2.0]},
    {"id": "tied:0", "subset": "Ties", "num_correct": 3, "scores": [4.0, 3.5, 3.8, 1.0, 2.0]},
    {"id": "ref:1", "subset": "Ties", "num_correct": 1, "scores": [2.0, 1.5]},
    {"id": "tied:1", "subset": "Ties", "num_correct": 2, "scores": [3.0, 1.0, 2.0, 0.0]},
    {"id": "ref:2", "subset": "Ties", "num_correct": 1, "scores": [1.0, 2.0]},
    {"id": "tied:3", "subset": "Ties", "num_correct": 2, "scores": [2.0, 2.0, 1.0]},
]


def v2_file(path: Path, records=V2_RECORDS) -> list[dict]:
    full = []
    for k, r in enumerate(records):
        c = r.get("num_correct", 1)
        texts = [f"answer {k}.{i}" for i in range(len(r["scores"]))]
        full.append({**r, "prompt": f"question {k}", "chosen": texts[:c], "rejected": texts[c:],
                     "num_correct": c, "num_incorrect": len(texts) - c,
                     "total_completions": len(texts), "models": ["m"] * len(texts)})
    path.write_text("".join(json.dumps(x) + "\n" for x in full))
    return full


# --------------------------------------------------------------------------- v1: hand-computed


def test_sections_weigh_subsets_by_the_official_counts():
    """Safety from xstest-should-refuse 1/2 (154), xstest-should-respond 5/5 (250),
    donotanswer 0/2 (136): (154 * 0.5 + 250 * 1 + 136 * 0) / 540 = 327 / 540 = 0.60556,
    not the pair-weighted 6 / 9 = 0.667.
    Reasoning from math-prm 0.8 (984) and hep-python 0.6, hep-go 0.4 (164 each):
    (984 * 0.8 + 164 * 0.6 + 164 * 0.4) / 1312 = 951.2 / 1312 = 0.72500, whatever the
    file's counts (600, 100 and 300 pairs here).
    Overall: the mean of the two sections present = 0.66528."""
    per = {"xstest-should-refuse": {"n": 2, "accuracy": 0.5},
           "xstest-should-respond": {"n": 5, "accuracy": 1.0},
           "donotanswer": {"n": 2, "accuracy": 0.0},
           "math-prm": {"n": 600, "accuracy": 0.8},
           "hep-python": {"n": 100, "accuracy": 0.6},
           "hep-go": {"n": 300, "accuracy": 0.4}}
    out = rewardbench_scores(per)
    assert out["sections"] == pytest.approx({"Safety": 327 / 540, "Reasoning": 951.2 / 1312})
    assert out["missing_sections"] == ["Chat", "Chat Hard"] and not out["complete"]
    assert out["overall"] == pytest.approx((327 / 540 + 951.2 / 1312) / 2)


def test_math_weighs_as_much_as_all_code():
    """All six hep-* subsets at 0.2 and math-prm at 1.0: Reasoning = 0.6 exactly."""
    per = {s: {"accuracy": 0.2} for s in SECTIONS["Reasoning"][1:]} | {"math-prm": {"accuracy": 1.0}}
    assert rewardbench_scores(per)["sections"]["Reasoning"] == pytest.approx(0.6)


def test_ties_count_zero_by_default_and_half_on_request():
    """diffs 1, 0, 0, -1: strict accuracy 1/4, half credit (1 + 0.5 + 0.5) / 4 = 1/2."""
    diffs = [1.0, 0.0, 0.0, -1.0]
    assert subset_accuracy(["a"] * 4, diffs) == {"a": {"n": 4, "accuracy": 0.25, "ties": 2}}
    assert subset_accuracy(["a"] * 4, diffs, "half")["a"]["accuracy"] == 0.5
    result = summarize(["chat", "chat", "reasoning", None], [1.0, 0.0, -2.0, 3.0])
    assert result["kind"] == "accuracy" and result["overall"] == 0.5 and result["ties"] == 1
    assert "1 pairs scored equal, each counted 0 (official)" in format_table(result)


def test_prior_sets_at_half_weight():
    """Chat 1.0, Chat Hard 0.5, Safety 0.5, Reasoning 0.0; prior sets anthropic_helpful 1.0 and
    shp 0.5 (plain mean 0.75). Off: (1 + 0.5 + 0.5 + 0) / 4 = 0.5.
    On: (2 * 2.0 + 0.75) / 9 = 4.75 / 9 = 0.52778."""
    per = {"alpacaeval-easy": {"accuracy": 1.0}, "mt-bench-hard": {"accuracy": 0.5},
           "donotanswer": {"accuracy": 0.5}, "hep-go": {"accuracy": 0.0},
           "anthropic_helpful": {"accuracy": 1.0}, "shp": {"accuracy": 0.5}}
    off, on = rewardbench_scores(per), rewardbench_scores(per, prior_sets=True)
    assert off["overall"] == pytest.approx(0.5) and "Prior Sets" not in off["sections"]
    assert on["sections"]["Prior Sets"] == pytest.approx(0.75)
    assert on["overall"] == pytest.approx(4.75 / 9)
    assert summarize(["shp", "hep-go"], [1.0, 1.0])["prior_sets"] == "not counted"
    assert summarize(["shp", "hep-go"], [1.0, 1.0], prior_sets=True)["prior_sets"] == "half weight"


def test_missing_section_is_named_in_the_table(tmp_path):
    subsets, c, r = _v1_scores(v1_file(tmp_path / "rb.jsonl", drop=SECTIONS["Chat Hard"]))
    result = summarize(subsets, [a - b for a, b in zip(c, r, strict=True)])
    table = format_table(result)
    assert result["missing_sections"] == ["Chat Hard"] and "Chat Hard" not in result["sections"]
    assert "Chat Hard" in table and "missing" in table and "mean of the 3 sections present" in table
    assert "prior sets in the file are not counted" in table


# --------------------------------------------------------------------------- v1: parity


@pytest.mark.parametrize("prior_sets", [False, True])
def test_v1_equals_the_official_scorer(official, tmp_path, prior_sets):
    subsets, c, r = _v1_scores(v1_file(tmp_path / "rb.jsonl"))
    ours = summarize(subsets, [a - b for a, b in zip(c, r, strict=True)], prior_sets=prior_sets)
    grouped, sections, overall = official_v1(official, subsets, c, r,
                                             prior=_prior(subsets, c, r) if prior_sets else None)
    assert {s: v["accuracy"] for s, v in ours["subsets"].items()} == pytest.approx(grouped)
    assert {k: v for k, v in ours["sections"].items() if k != "Prior Sets"} == pytest.approx(sections)
    assert ours["overall"] == pytest.approx(overall, abs=1e-12)
    assert ours["ties"] == 4 and ours["prior_sets"] == ("half weight" if prior_sets else "not counted")


def _prior(subsets, c, r) -> dict[str, float]:
    out: dict[str, list[int]] = {}
    for s, a, b in zip(subsets, c, r, strict=True):
        if s in ("anthropic_helpful", "anthropic_hhh", "shp", "summarize"):
            out.setdefault(s, []).append(a > b)
    return {s: sum(v) / len(v) for s, v in out.items()}


def test_v1_missing_section_against_the_official_scorer(official, tmp_path):
    """The official scorer prints 0 for a section without data; we leave it out and name it."""
    subsets, c, r = _v1_scores(v1_file(tmp_path / "rb.jsonl", drop=SECTIONS["Safety"]))
    ours = summarize(subsets, [a - b for a, b in zip(c, r, strict=True)])
    _, sections, _ = official_v1(official, subsets, c, r)
    assert sections["Safety"] == 0 and ours["missing_sections"] == ["Safety"]
    assert ours["sections"] == pytest.approx({k: v for k, v in sections.items() if k != "Safety"})
    assert ours["overall"] == pytest.approx(sum(ours["sections"].values()) / 3)


# --------------------------------------------------------------------------- v2


def test_best_of_n_credit_hand_computed():
    assert best_of_n_credit([3, 1, 2, 0]) == 1.0
    assert best_of_n_credit([3, 3, 2, 0]) == 0.5
    assert best_of_n_credit([2, 2, 2, 1]) == pytest.approx(1 / 3)
    assert best_of_n_credit([2, 2, 3, 1]) == 0.0


def test_ties_score_hand_computed():
    """ref:0 [4 | 1, 2] accurate, sep 2; tied:0 [4, 3.5, 3.8 | 1, 2] accurate, gap 0.5,
    sep 1.5. ref:1 [2 | 1.5] accurate, sep 0.5; tied:1 [3, 1 | 2, 0] not accurate, gap 2,
    sep -1. acc(ref) = 1, acc(tied) = 1/2. Common prompts 0, 1: preferred = [1.5 > 0.5,
    -1 > 2] = 1/2; hard = [min(2, 1.5) > 0.5, min(0.5, -1) > 2] = 1/2; ratios 1.5 / 0.5 = 3 and
    -1 / 2: margin = (tanh(2) + tanh(-1.5)) / 2.
    Score = 0.3 * 0.5 + 0.3 * 1 + 0.2 * 0.5 + 0.2 * 0.5 + 0.01 * margin."""
    recs = [Scored(r["id"], "Ties", r["scores"], r["num_correct"]) for r in V2_RECORDS[6:10]]
    margin = (math.tanh(2) + math.tanh(-1.5)) / 2
    assert ties_score(recs) == pytest.approx(0.15 + 0.3 + 0.1 + 0.1 + 0.01 * margin)


def test_v2_scores_hand_computed_and_missing_subsets():
    """Factuality (1 + 0 + 1/2) / 3 = 1/2, Math (1/3 + 1) / 2 = 2/3, Focus 0; overall the
    unweighted mean of the four subsets present with Ties."""
    recs = [Scored(r["id"], r["subset"], r["scores"], r.get("num_correct", 1)) for r in V2_RECORDS]
    out = rewardbench2_scores(recs)
    ties = ties_score(recs[6:])
    assert {s: v["accuracy"] for s, v in out["subsets"].items()} == pytest.approx(
        {"Factuality": 0.5, "Math": 2 / 3, "Focus": 0.0, "Ties": ties})
    assert out["overall"] == pytest.approx((0.5 + 2 / 3 + 0 + ties) / 4)
    assert out["missing_subsets"] == ["Precise IF", "Safety"] and out["kind"] == "rewardbench2"
    assert out["subsets"]["Factuality"]["tied_top"] == 1 and out["subsets"]["Math"]["tied_top"] == 1


def test_v2_equals_the_official_scorer(official, tmp_path):
    full = v2_file(tmp_path / "rb2.jsonl")
    records, _ = read_best_of_n(str(tmp_path / "rb2.jsonl"))
    assert [r.responses for r in records] == [f["chosen"] + f["rejected"] for f in full]
    ours = rewardbench2_scores([Scored(r.id, r.subset, f["scores"], r.num_correct)
                                for r, f in zip(records, full, strict=True)])
    theirs = official_v2(official, full)
    assert {s: v["accuracy"] for s, v in ours["subsets"].items()} == pytest.approx(theirs, abs=1e-12)
    assert ours["overall"] == pytest.approx(np.mean(list(theirs.values())), abs=1e-12)


def test_format_detection_and_bad_v2_records(tmp_path):
    v2_file(tmp_path / "v2.jsonl")
    v1_file(tmp_path / "v1.jsonl")
    conv = tmp_path / "conv.jsonl"
    conv.write_text(json.dumps({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}],
                                "rejected": [{"role": "assistant", "content": "b"}]}) + "\n")
    assert [detect_format(str(tmp_path / f), "test") for f in ("v2.jsonl", "v1.jsonl", "conv.jsonl")] == [
        "v2", "v1", "v1"]
    bad = tmp_path / "bad.jsonl"
    good = json.loads((tmp_path / "v2.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "7", "subset": "Ties"}) + "\n"
                   + json.dumps({**good, "rejected": "no"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl, line 2: field 'id': a Ties record's id is 'ref:N' or "
                       r"'tied:N', got '7'$"):
        read_best_of_n(str(bad))
    records, skipped = read_best_of_n(str(bad), on_bad="skip")
    assert len(records) == 1 and sum(skipped.values()) == 2
    assert [k.split(":")[0] for k in sorted(skipped)] == ["field 'id'", "field 'rejected'"]


# --------------------------------------------------------------------------- trained judges


def _eval(capsys, *args) -> dict:
    capsys.readouterr()
    assert main([*args, "progress=false"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _texts(n: int) -> list[tuple[str, str, str]]:
    """(prompt, a better answer, a worse one) in the sandbox's style."""
    return [(f"What is {k} + {k + 1}?", f"Answer: {2 * k + 1}",
             f"Let me think about it for a while. Answer: {2 * k + 3}") for k in range(n)]


def official_v1_rows(plan) -> list[dict]:
    """Pairs with the official v1 columns and types (``id`` an int64, the two models named)."""
    rows, texts = [], iter(_texts(sum(n for _, n in plan)))
    for subset, n in plan:
        for _ in range(n):
            p, a, b = next(texts)
            rows.append({"prompt": p, "chosen": a if len(rows) % 3 else b, "chosen_model": "gpt-4",
                         "rejected": b if len(rows) % 3 else a, "rejected_model": "llama-2-7b-chat",
                         "subset": subset, "id": 30 + len(rows)})
    return rows


def _parquet(tmp_path: Path, rows: list[dict]) -> str:
    """``rows`` as a parquet file typed as the hub's (``id`` int64)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    assert table.schema.field("id").type == pa.int64()
    pq.write_table(table, tmp_path / "rb.parquet")
    return str(tmp_path / "rb.parquet")


def test_rm_eval_v1_equals_the_official_scorer(trained_rm, official, tmp_path, capsys):
    from rlhf_workflow.reward.bt import load_reward_model, score

    plan = [("alpacaeval-easy", 3), ("mt-bench-med", 1), ("llmbar-natural", 2), ("xstest-should-refuse", 2),
            ("xstest-should-respond", 3), ("math-prm", 3), ("hep-go", 1), ("hep-rust", 2), ("shp", 2)]
    rows = official_v1_rows(plan)
    path = tmp_path / "rb.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    ours = _eval(capsys, "rm", "eval", f"model.path={trained_rm}", "--in", str(path), "prior_sets=true")
    parquet = _eval(capsys, "rm", "eval", f"model.path={trained_rm}", "--in", _parquet(tmp_path, rows),
                    "prior_sets=true")
    assert {k: parquet[k] for k in ("subsets", "sections", "overall")} == {
        k: ours[k] for k in ("subsets", "sections", "overall")}

    model, tok = load_reward_model(trained_rm)
    prompts = [[{"role": "user", "content": x["prompt"]}] for x in rows]
    c = score(model, tok, prompts, [x["chosen"] for x in rows], max_length=2048, progress=False)
    r = score(model, tok, prompts, [x["rejected"] for x in rows], max_length=2048, progress=False)
    assert min(abs(a - b) for a, b in zip(c, r, strict=True)) > 1e-4  # no pair near a tie
    subsets = [x["subset"] for x in rows]
    grouped, sections, overall = official_v1(official, subsets, c, r, prior=_prior(subsets, c, r))
    assert ours["format"] == "v1" and ours["kind"] == "rewardbench" and ours["complete"]
    assert {s: v["accuracy"] for s, v in ours["subsets"].items()} == pytest.approx(grouped)
    assert {k: v for k, v in ours["sections"].items() if k != "Prior Sets"} == pytest.approx(sections)
    assert ours["sections"]["Prior Sets"] == pytest.approx(grouped["shp"])
    assert overall is not None and ours["overall"] == pytest.approx(overall)
    # the held-out BT loss, -log sigmoid(r_chosen - r_rejected), by hand
    assert ours["loss"] == pytest.approx(sum(math.log1p(math.exp(b - a)) for a, b in zip(c, r, strict=True)) / len(c),
                                         rel=1e-5)


def test_rm_eval_v2_equals_the_official_scorer(trained_rm, official, tmp_path, capsys):
    from rlhf_workflow.reward.bt import load_reward_model, score

    recs, texts = [], _texts(8)
    for k, (p, a, b) in enumerate(texts[:6]):
        subset = ("Factuality", "Precise IF", "Math", "Safety", "Focus", "Math")[k]
        recs.append({"id": str(k), "subset": subset, "prompt": p, "chosen": [a if k % 2 else b],
                     "rejected": [b if k % 2 else a, f"Answer: {k}", f"I am not sure. Answer: {k + 7}"]})
    for k in range(2):
        p, a, b = texts[6 + k]
        recs.append({"id": f"ref:{k}", "subset": "Ties", "prompt": p, "chosen": [a],
                     "rejected": [b, "Answer: 0"]})
        recs.append({"id": f"tied:{k}", "subset": "Ties", "prompt": p, "chosen": [a, a + " Indeed."],
                     "rejected": [b, "Answer: 0"]})
    for r in recs:
        r["num_correct"] = len(r["chosen"])
    path = tmp_path / "rb2.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in recs))
    ours = _eval(capsys, "rm", "eval", f"model.path={trained_rm}", "--in", str(path))

    model, tok = load_reward_model(trained_rm)
    flat = [([{"role": "user", "content": r["prompt"]}], t) for r in recs for t in r["chosen"] + r["rejected"]]
    values = iter(score(model, tok, [p for p, _ in flat], [t for _, t in flat], progress=False))
    for r in recs:
        r["scores"] = [next(values) for _ in r["chosen"] + r["rejected"]]
    theirs = official_v2(official, recs)
    assert ours["format"] == "v2" and ours["kind"] == "rewardbench2" and ours["missing_subsets"] == []
    assert {s: v["accuracy"] for s, v in ours["subsets"].items()} == pytest.approx(theirs)
    assert ours["overall"] == pytest.approx(np.mean(list(theirs.values())))


def test_pm_eval_v1_reads_the_official_columns(trained_pm, tmp_path, capsys):
    """The hub's v1 parquet (integer ids): every pair scored, each subset's accuracy the share
    of its pairs the PM puts the chosen above the rejected in."""
    from rlhf_workflow.reward.pm import compare, load_preference_model

    rows = official_v1_rows([("alpacaeval-easy", 3), ("llmbar-natural", 2), ("donotanswer", 2)])
    ours = _eval(capsys, "pm", "eval", f"model.path={trained_pm}", "--in", _parquet(tmp_path, rows))

    model, tok = load_preference_model(trained_pm)
    probs = compare(model, tok, [([{"role": "user", "content": x["prompt"]}], x["chosen"], x["rejected"])
                                 for x in rows]).probs
    wins: dict[str, list[float]] = {}
    for x, p in zip(rows, probs, strict=True):
        wins.setdefault(x["subset"], []).append(float(p > 0.5))  # a tie scores 0 (ties=zero)
    assert ours["skipped_invalid"] == {} and sum(v["n"] for v in ours["subsets"].values()) == len(rows)
    assert {s: v["accuracy"] for s, v in ours["subsets"].items()} == pytest.approx(
        {s: sum(v) / len(v) for s, v in wins.items()})


def test_pm_eval_v2_equals_the_official_scorer(trained_pm, official, tmp_path, capsys):
    from rlhf_workflow.reward.pm import load_preference_model
    from rlhf_workflow.reward.ranking import rank_with_pm

    full = v2_file(tmp_path / "rb2.jsonl", [r for r in V2_RECORDS if r["subset"] != "Focus"])
    ours = _eval(capsys, "pm", "eval", f"model.path={trained_pm}", "--in", str(tmp_path / "rb2.jsonl"))
    tour = _eval(capsys, "pm", "eval", f"model.path={trained_pm}", "--in", str(tmp_path / "rb2.jsonl"),
                 "pm_mode=tournament")

    model, tok = load_preference_model(trained_pm)
    prompts = [[{"role": "user", "content": f["prompt"]}] for f in full]
    responses = [f["chosen"] + f["rejected"] for f in full]
    for f, rk in zip(full, rank_with_pm(model, tok, prompts, responses, "round_robin"), strict=True):
        f["scores"] = rk.scores
    theirs = official_v2(official, full)
    assert {s: v["accuracy"] for s, v in ours["subsets"].items()} == pytest.approx(theirs)
    # tournament: a prompt scores 1 exactly when the chosen wins the knockout
    plain = [k for k, f in enumerate(full) if f["subset"] != "Ties"]
    wins = rank_with_pm(model, tok, [prompts[k] for k in plain], [responses[k] for k in plain], "tournament")
    by_subset: dict[str, list[float]] = {}
    for k, rk in zip(plain, wins, strict=True):
        by_subset.setdefault(full[k]["subset"], []).append(float(rk.best == 0))
    assert {s: tour["subsets"][s]["accuracy"] for s in by_subset} == pytest.approx(
        {s: sum(v) / len(v) for s, v in by_subset.items()})
    assert tour["subsets"]["Ties"]["accuracy"] == pytest.approx(theirs["Ties"])  # round robin either way
