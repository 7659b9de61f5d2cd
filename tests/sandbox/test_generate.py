import json
from collections import Counter

import pytest

from rlhf_workflow.config import load_config
from rlhf_workflow.errors import UserError
from rlhf_workflow.sandbox import (
    SKILLS,
    MakeDataConfig,
    corpus,
    gold_reward,
    make_data,
    make_preferences,
    make_prompts,
    make_sft,
)
from rlhf_workflow.sandbox.tasks import FILLERS, get_skill


def test_make_prompts_records_and_balance():
    prompts = make_prompts(400, seed=3)
    assert [p["id"] for p in prompts[:2]] == ["p-3-0", "p-3-1"]
    assert len({p["id"] for p in prompts}) == 400
    assert Counter(p["meta"]["skill"] for p in prompts) == {s: 100 for s in SKILLS}
    for p in prompts:
        json.dumps(p)
        assert set(p) == {"id", "prompt", "meta"} and p["meta"]["answer"]
    only = make_prompts(10, seed=0, skills=["sort"])
    assert {p["meta"]["skill"] for p in only} == {"sort"}
    with pytest.raises(ValueError, match="valid skills"):
        make_prompts(3, seed=0, skills=["divide"])


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: make_prompts(50, seed),
        lambda seed: make_sft(50, seed),
        lambda seed: make_preferences(50, seed),
        lambda seed: corpus(seed),
    ],
)
def test_determinism(make):
    assert make(0) == make(0)
    assert make(0) != make(1)


def test_sft_records_and_error_rate():
    recs = make_sft(4000, seed=0)
    for r in recs[:50]:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        score = gold_reward(r["meta"], assistant["content"])
        assert score.correct == r["meta"]["demo_correct"]
        assert (score.filler_words > 0) == (r["meta"]["n_fillers"] > 0)
    wrong = sum(not gold_reward(r["meta"], r["messages"][1]["content"]).correct for r in recs)
    assert abs(wrong / 4000 - 0.3) < 0.03
    filler = Counter(r["meta"]["n_fillers"] for r in recs)
    assert abs((4000 - filler[0]) / 4000 - 0.5) < 0.03
    assert set(filler) == {0, 1, 2, 3}
    clean = make_sft(200, seed=0, error_rate=0.0, filler_rate=0.0)
    assert all(r["messages"][1]["content"] == f"Answer: {r['meta']['answer']}" for r in clean)


def test_preferences_structure():
    prefs = make_preferences(2000, seed=0)
    subsets = Counter(p["subset"] for p in prefs)
    assert set(subsets) == {"reasoning", "chat"} and abs(subsets["chat"] / 2000 - 0.5) < 0.05
    for p in prefs:
        assert p["chosen"] != p["rejected"]
        assert set(p) == {"prompt", "chosen", "rejected", "subset", "meta"}
        meta = p["meta"]
        assert 0.0 < meta["p_chosen"] < 1.0
        c, r = gold_reward(meta, p["chosen"]), gold_reward(meta, p["rejected"])
        if p["subset"] == "chat":
            assert c.correct and r.correct and c.filler_words != r.filler_words
        else:
            assert c.correct != r.correct
        for resp in (p["chosen"], p["rejected"]):
            fillers = resp.split("Answer:")[0]
            assert fillers.count(".") <= 3
    assert all(p["subset"] == "chat" for p in make_preferences(50, 0, chat_fraction=1.0))


def test_preference_label_noise_and_length_bias():
    prefs = make_preferences(4000, seed=1)
    reasoning = [p for p in prefs if p["subset"] == "reasoning"]
    right_wins = sum(gold_reward(p["meta"], p["chosen"]).correct for p in reasoning)
    assert 0.85 < right_wins / len(reasoning) < 0.995  # mostly right, but noisy
    chat = [p for p in prefs if p["subset"] == "chat"]
    longer_wins = sum(len(p["chosen"].split()) > len(p["rejected"].split()) for p in chat)
    assert longer_wins / len(chat) > 0.6  # the annotator's length bias
    # p_chosen is the probability of the emitted label: its mean matches how often labels
    # agree with the annotator's preferred side
    mean_p = sum(p["meta"]["p_chosen"] for p in prefs) / len(prefs)
    assert 0.6 < mean_p < 0.95


def test_preferences_without_length_bias_prefer_short_chat_answers():
    prefs = make_preferences(2000, seed=2, length_bias=0.0, chat_fraction=1.0)
    longer_wins = sum(len(p["chosen"].split()) > len(p["rejected"].split()) for p in prefs)
    assert longer_wins / len(prefs) < 0.5


def test_corpus_covers_vocabulary():
    texts = corpus()
    assert 1000 <= len(texts) <= 10000 and all(isinstance(t, str) for t in texts)
    joined = " ".join(texts)
    words = set(joined.split())
    assert {"A", "B"} <= set(texts) and "Answer:" in words
    assert {str(i) for i in range(100)} <= words
    assert set("abcdefghijklmnopqrstuvwxyz") <= words
    for f in FILLERS:
        assert f in texts
    for skill in SKILLS:
        for phrasing in get_skill(skill).phrasings:
            prefix = phrasing.split("{")[0]
            assert any(t.startswith(prefix) for t in texts)


def test_config_validation():
    cfg = MakeDataConfig()
    assert cfg.skills == list(SKILLS) and cfg.error_rate == 0.3
    assert all(f.description for f in MakeDataConfig.model_fields.values())
    with pytest.raises(UserError, match="valid skills: add, compare, sort, reverse"):
        load_config(MakeDataConfig, overrides=["skills=[add, divide]"])
    with pytest.raises(UserError, match="error_rate"):
        load_config(MakeDataConfig, overrides=["error_rate=1.5"])
    with pytest.raises(UserError, match="annotator_temperature"):
        load_config(MakeDataConfig, overrides=["annotator_temperature=0"])


def test_make_data_writes_all_files(tmp_path):
    cfg = MakeDataConfig(
        out=str(tmp_path / "data"),
        n_train_prompts=80,
        n_eval_prompts=20,
        n_sft=100,
        n_prefs=60,
        n_prefs_test=30,
    )
    paths = make_data(cfg)
    expected = {
        "prompts_train": 80,
        "prompts_eval": 20,
        "sft": 100,
        "prefs_train": 60,
        "prefs_test": 30,
    }
    records = {}
    for name, n in expected.items():
        lines = paths[name].read_text().splitlines()
        assert paths[name].name == f"{name}.jsonl" and len(lines) == n
        records[name] = [json.loads(line) for line in lines]
    train_ids = {p["id"] for p in records["prompts_train"]}
    eval_ids = {p["id"] for p in records["prompts_eval"]}
    assert not train_ids & eval_ids
    assert [p["prompt"] for p in records["prompts_train"][:20]] != [
        p["prompt"] for p in records["prompts_eval"]
    ]
    assert records["prefs_train"][0]["prompt"] != records["prefs_test"][0]["prompt"]
    stats = json.loads(paths["stats"].read_text())
    assert stats["counts"] == expected
    sft_wrong = sum(not r["meta"]["demo_correct"] for r in records["sft"]) / 100
    assert stats["sft_error_rate"] == pytest.approx(sft_wrong)
    assert sum(stats["prefs_train"]["subsets"].values()) == 60
    assert not list(tmp_path.glob("data/.*.tmp"))
    # same config, same bytes
    before = {n: p.read_bytes() for n, p in paths.items()}
    assert {n: p.read_bytes() for n, p in make_data(cfg).items()} == before


def test_make_data_prints_each_file_with_its_counts(tmp_path, capsys):
    from rlhf_workflow.cli import main

    out = tmp_path / "data"
    assert main(["sandbox", "make-data", f"out={out}", "n_train_prompts=12", "n_eval_prompts=5", "n_sft=9",
                 "n_prefs=7", "n_prefs_test=6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stats = json.loads((out / "stats.json").read_text())
    assert lines[0] == f"sandbox data -> {out}"
    shown = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert shown == {"prompts_train.jsonl": "12", "prompts_eval.jsonl": "5", "sft.jsonl": "9",
                     "prefs_train.jsonl": "7", "prefs_test.jsonl": "6", "stats.json": "counts,"}
    sft_line = next(x for x in lines if x.split()[0] == "sft.jsonl")
    assert f"{stats['sft_error_rate']:.1%} with a wrong answer" in sft_line
    test_line = next(x for x in lines if x.split()[0] == "prefs_test.jsonl")
    assert f"in {stats['prefs_test']['gold_agreement']:.1%}" in test_line
