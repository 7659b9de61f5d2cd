"""Reward model and preference model on the pretrained model, checked against plain
transformers reading each unpadded sequence on its own."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_workflow.io import write_jsonl

pytestmark = pytest.mark.real


def pairs_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line]


@torch.no_grad()
def plain_reward(model, tok, prompt: str, response: str) -> float:
    """The score head at the last token of the unpadded chat-templated sequence."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
    return model.score(hidden).item()


@pytest.fixture(scope="module")
def plain_rm(reward_model, real_model, tier):
    tier.assert_plain_reload(reward_model, real_model, "AutoModelForSequenceClassification")
    return AutoModelForSequenceClassification.from_pretrained(reward_model).eval(), \
        AutoTokenizer.from_pretrained(reward_model)


@pytest.fixture(scope="module")
def varied_rollouts(data, tmp_path_factory):
    """2 prompts x 4 responses of very different lengths (so scoring batches are padded)."""
    rows = []
    for i, p in enumerate(pairs_of(data / "prefs_test.jsonl")[:2]):
        rows.append({"id": f"v{i}", "prompt": p["prompt"], "meta": p["meta"],
                     "responses": [p["chosen"], p["rejected"], "Answer: 1",
                                   "I am happy to help. Let me think about it. " * 3 + "Answer: 2"]})
    path = tmp_path_factory.mktemp("varied") / "rollouts.jsonl"
    write_jsonl(path, rows)
    return path


def test_rm_gets_a_dedicated_pad_token(reward_model, real_model, plain_rm):
    src = AutoTokenizer.from_pretrained(real_model)
    assert src.pad_token_id == src.eos_token_id  # the model ships with pad == eos == <|im_end|>
    model, tok = plain_rm
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id not in (tok.eos_token_id, None)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().num_embeddings == len(tok) == len(src) + 1


def test_rm_held_out_eval_matches_the_saved_model(reward_model, data, plain_rm):
    """eval.json is computed by the trained model in memory; the saved one, read back by plain
    transformers one sequence at a time, gives the same held-out loss and accuracy."""
    model, tok = plain_rm
    result = json.loads((reward_model.parent / "eval.json").read_text())
    assert result["truncated"] == 0 and result["held_out_pairs"] == 8
    diffs = [plain_reward(model, tok, p["prompt"], p["chosen"]) - plain_reward(model, tok, p["prompt"], p["rejected"])
             for p in pairs_of(data / "prefs_test.jsonl")]
    loss = sum(-torch.nn.functional.logsigmoid(torch.tensor(d)).item() for d in diffs) / len(diffs)
    acc = sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs) / len(diffs)
    assert result["loss"] == pytest.approx(loss, abs=1e-4)
    assert result["accuracy"] == pytest.approx(acc)


def test_rm_eval_agrees_with_training_eval(reward_model, data, tier, tmp_path):
    out = tmp_path / "rm_eval.json"
    tier.run("rm", "eval", f"model.path={reward_model}", f"input={data / 'prefs_test.jsonl'}", f"out={out}",
             "max_length=128", "progress=false")
    train_eval = json.loads((reward_model.parent / "eval.json").read_text())
    assert json.loads(out.read_text())["overall"] == pytest.approx(train_eval["accuracy"])


def test_annotate_reads_the_last_response_token(reward_model, varied_rollouts, plain_rm, tier, tmp_path):
    annotated = tmp_path / "annotated.jsonl"
    tier.run("annotate", f"input={varied_rollouts}", f"out={annotated}", f"annotator.path={reward_model}",
             "annotator.kind=bt", "annotator.batch_size=16")  # the judge's default precision: fp32
    model, tok = plain_rm
    rows = pairs_of(varied_rollouts)
    alone = [plain_reward(model, tok, r["prompt"], x) for r in rows for x in r["responses"]]
    got = [x for r in pairs_of(annotated) for x in r["rewards"]]
    assert got == pytest.approx(alone, abs=1e-4)  # padded batches of very different lengths
    assert max(alone) - min(alone) > 1e-3  # the rewards tell responses apart


@torch.no_grad()
def plain_p_first(model, tok, prompt: str, a: str, b: str) -> float:
    """P(A) of the preference model over its two label tokens, on one unpadded comparison."""
    user = f"[CONTEXT] {prompt} [RESPONSE A] {a} [RESPONSE B] {b}"
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    logits = model(input_ids=torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])).logits[0, -1]
    ids = [tok.convert_tokens_to_ids(x) for x in ("A", "B")]
    return logits[ids].softmax(-1)[0].item()


def test_pm_eval_matches_the_saved_model(preference_model, real_model, data, tier, tmp_path):
    plain, tok = tier.assert_plain_reload(preference_model, real_model)
    assert isinstance(plain, type(AutoModelForCausalLM.from_pretrained(real_model)))
    result = json.loads((preference_model.parent / "eval.json").read_text())
    probs, nll = [], []
    for p in pairs_of(data / "prefs_test.jsonl"):
        ab = plain_p_first(plain, tok, p["prompt"], p["chosen"], p["rejected"])
        ba = plain_p_first(plain, tok, p["prompt"], p["rejected"], p["chosen"])
        probs.append(0.5 * (ab + 1 - ba))
        nll.append(-math.log(ab) - math.log(1 - ba))
    acc = sum(1.0 if x > 0.5 else 0.5 if x == 0.5 else 0.0 for x in probs) / len(probs)
    assert result["truncated"] == 0
    assert result["loss"] == pytest.approx(sum(nll) / (2 * len(nll)), abs=1e-4)
    assert result["accuracy"] == pytest.approx(acc)
    out = tmp_path / "pm_eval.json"
    tier.run("pm", "eval", f"model.path={preference_model}", f"input={data / 'prefs_test.jsonl'}", f"out={out}",
             "max_length=192", "progress=false")
    assert json.loads(out.read_text())["overall"] == pytest.approx(acc)
