"""The DPO implicit reward as a judge: ``beta * (log pi(y|x) - log pi_ref(y|x))`` equals the
textbook computation (the chat template's response tokens, all logits, log-softmax), and the
evaluation, the annotator and the loop's checks use it."""

import json

import pytest
import torch

from rlhf_workflow.cli import main
from rlhf_workflow.config import ModelConfig
from rlhf_workflow.data.readers import iter_rows, read_records
from rlhf_workflow.data.records import Rollout
from rlhf_workflow.errors import UserError
from rlhf_workflow.io import write_jsonl
from rlhf_workflow.models.loading import load_model, load_tokenizer
from rlhf_workflow.models.tiny import InitModelConfig, init_model
from rlhf_workflow.online.annotate import AnnotatorConfig
from rlhf_workflow.reward.bt import load_reward_model, score

BETA = 0.5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A second tiny model with the policy's shape and tokenizer and other weights."""
    out = tmp_path_factory.mktemp("reference") / "model"
    init_model(InitModelConfig(out=str(out), hidden_size=64, intermediate_size=128, num_heads=4,
                               num_kv_heads=2, vocab_size=600, seed=1))
    return out


def textbook_logp(model, tok, prompt: str, response: str) -> float:
    """Sum of log p(token) over the response tokens as the chat template renders the turn, up
    to its end-of-turn token (what follows it is template layout, not the model's to say)."""
    user = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=True,
                                   return_dict=False)
    assert full[: len(head)] == head
    ids = torch.tensor([full])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    end = full.index(tok.eos_token_id, len(head)) + 1
    return sum(lp[t - 1, full[t]].item() for t in range(len(head), end))


def test_rewards_and_held_out_accuracy_equal_the_textbook_computation(tiny_model, reference, sandbox_data,
                                                                      tmp_path):
    rows = [r for _, r in iter_rows(sandbox_data / "prefs_test.jsonl")][:24]
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{k: r[k] for k in ("prompt", "chosen", "rejected", "subset")} for r in rows])
    tok = load_tokenizer(ModelConfig(path=str(tiny_model)))
    pol, ref = (load_model(ModelConfig(path=str(p))).eval() for p in (tiny_model, reference))

    def r(prompt, response):
        return BETA * (textbook_logp(pol, tok, prompt, response) - textbook_logp(ref, tok, prompt, response))

    judge, jtok = load_reward_model(tiny_model, reference=str(reference), beta=BETA)
    got = score(judge, jtok, [[{"role": "user", "content": x["prompt"]}] for x in rows for _ in (0, 1)],
                [y for x in rows for y in (x["chosen"], x["rejected"])], batch_size=5, progress=False)
    want = [r(x["prompt"], y) for x in rows for y in (x["chosen"], x["rejected"])]
    assert got == pytest.approx(want, abs=1e-4) and max(map(abs, want)) > 0.1  # (policy != reference)

    out = tmp_path / "eval.json"
    assert main(["rm", "eval", f"model.path={tiny_model}", f"reference={reference}", f"beta={BETA}",
                 "--in", str(pairs), f"out={out}", "progress=false"]) == 0
    result = json.loads(out.read_text())
    wins = [c > j for c, j in zip(want[::2], want[1::2], strict=True)]
    assert result["judge"].startswith("dpo") and result["overall"] == pytest.approx(sum(wins) / len(wins))


def test_annotator_scores_rollouts_with_the_implicit_reward(tiny_model, reference, tmp_path):
    rollouts = [{"id": f"r{i}", "prompt": f"What is {i} + 2?", "responses": [f"Answer: {i + 2}", "Answer: 0"]}
                for i in range(5)]
    write_jsonl(tmp_path / "rollouts.jsonl", rollouts)
    out = tmp_path / "scored.jsonl"
    assert main(["annotate", "--in", str(tmp_path / "rollouts.jsonl"), "--out", str(out), "annotator.kind=dpo",
                 f"annotator.path={tiny_model}", f"annotator.reference={reference}", f"annotator.beta={BETA}"]) == 0
    got = [x for s in read_records(out, Rollout) for x in s.rewards]
    tok = load_tokenizer(ModelConfig(path=str(tiny_model)))
    pol, ref = (load_model(ModelConfig(path=str(p))).eval() for p in (tiny_model, reference))
    want = [BETA * (textbook_logp(pol, tok, r["prompt"], y) - textbook_logp(ref, tok, r["prompt"], y))
            for r in rollouts for y in r["responses"]]
    assert got == pytest.approx(want, abs=1e-4)


def test_a_dpo_annotator_needs_its_reference_and_the_same_vocabulary(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="reference"):
        AnnotatorConfig(kind="dpo", path="x")
    with pytest.raises(ValueError, match="reference"):
        AnnotatorConfig(kind="bt", path="x", reference="y")
    other = tmp_path / "other"
    init_model(InitModelConfig(out=str(other), hidden_size=64, intermediate_size=128, num_heads=4,
                               num_kv_heads=2, vocab_size=300))
    with pytest.raises(UserError, match="different vocabularies"):
        load_reward_model(tiny_model, reference=str(other))
