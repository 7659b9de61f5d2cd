"""Consistency checks of a loop config (``rlhf check``) on tokenizers and templates made here,
and a judge with another tokenizer than the policy's scoring each response under its own
template."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from tokenizers import processors
from transformers import GenerationConfig, LlamaConfig, LlamaForSequenceClassification

from rlhf_workflow.checks import (
    Finding,
    Loaded,
    check_bos,
    check_lengths,
    check_loop,
    check_pad,
    check_prefix_stable,
    check_same_tokenizer,
    check_stops,
    check_system_prompt,
    check_template,
    end_of_turn,
)
from rlhf_workflow.cli import main
from rlhf_workflow.config import load_config
from rlhf_workflow.data.chat import encode_prompt, render
from rlhf_workflow.generation.sampling import SamplingConfig
from rlhf_workflow.models.tiny import TEMPLATES, tiny_config, train_tokenizer
from rlhf_workflow.online.loop import LoopConfig
from rlhf_workflow.sandbox import corpus


@pytest.fixture(scope="module")
def toks():
    """Fresh tokenizers per template (the tests change copies of them)."""
    return {t: train_tokenizer(corpus()[:800], vocab_size=400, template=t) for t in ("chatml", "llama3")}


def variant(tok, template: str | None = None, **tokens):
    out = copy.deepcopy(tok)
    if template is not None:
        out.chat_template = template
    for name, value in tokens.items():
        setattr(out, name, value)
    return out


def adds_bos(tok):
    """The tokenizer now puts BOS in front of any text encoded with special tokens."""
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


def loaded(tok, **config) -> Loaded:
    cfg = tiny_config(tok)
    for k, v in config.items():
        setattr(cfg, k, v)
    return Loaded(tok, cfg, GenerationConfig(eos_token_id=config.get("eos_token_id", tok.eos_token_id)))


def levels(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.who, f.level) for f in findings]


def test_the_tiny_templates_pass(tokenizer):
    """ChatML and Llama-3 templates as `rlhf init-model` writes them: nothing to report."""
    assert check_template("policy", tokenizer) == []
    assert check_stops("policy", loaded(tokenizer), {"generate.sampling": SamplingConfig()}) == []


def test_double_bos(toks):
    llama = toks["llama3"]
    twice = variant(llama, "{{ bos_token }}" + llama.chat_template)
    [f] = check_bos("policy", twice)
    assert f.level == "error" and "starts with 2 '<|begin_of_text|>' tokens" in f.problem

    # the template writes BOS, the tokenizer adds one: one BOS here, two for a tool that
    # encodes the rendered text with special tokens
    both = adds_bos(variant(llama))
    bos = both.bos_token_id
    text = render(both, [{"role": "user", "content": "hi"}], True)
    assert encode_prompt(both, [{"role": "user", "content": "hi"}])[:2] != [bos, bos]
    assert both(text)["input_ids"][:2] == [bos, bos]
    [f] = check_bos("policy", both)
    assert f.level == "warning" and f.problem.startswith("double BOS elsewhere")
    assert "add_bos_token=false" in f.fix

    # the tokenizer adds BOS to plain text, the template writes none: no BOS here at all
    none = adds_bos(variant(llama, llama.chat_template.replace("{{ bos_token }}", "")))
    [f] = check_bos("policy", none)
    assert f.level == "warning" and f.problem.startswith("no BOS") and "{{ bos_token }}" in f.fix
    assert check_bos("policy", llama) == []


def test_end_of_turn_token_the_generator_does_not_stop_on(toks):
    """A Llama-3 base-style setup: EOS is <|end_of_text|> but turns end with <|eot_id|>."""
    llama = toks["llama3"]
    base = variant(llama, eos_token="<|end_of_text|>")
    eot = llama.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn(base) == ("<|eot_id|>", eot)
    parts = loaded(base, eos_token_id=base.eos_token_id)
    samplings = {"generate.sampling": SamplingConfig(), "eval.sampling": SamplingConfig()}
    found = check_stops("policy", parts, samplings)
    assert levels(found) == [("policy", "error")] * 2
    assert f"(id {eot})" in found[0].problem and f"generate.sampling.stop_token_ids=[{eot}]" in found[0].fix
    fixed = {"generate.sampling": SamplingConfig(stop_token_ids=[eot]), "eval.sampling": SamplingConfig()}
    assert [f.fix.split("=")[0] for f in check_stops("policy", parts, fixed)] == ["set eval.sampling.stop_token_ids"]

    plain = variant(toks["chatml"], TEMPLATES["chatml"]["chat_template"].replace("<|im_end|>", "###"))
    [f] = check_stops("policy", loaded(plain), samplings)
    assert "'###', which is not a special token" in f.problem and "stop=['###']" in f.fix
    bare = variant(toks["chatml"], TEMPLATES["chatml"]["chat_template"].replace("<|im_end|>\n", ""))
    [f] = check_stops("policy", loaded(bare), samplings)
    assert "writes nothing after an assistant turn" in f.problem


def test_pad_on_a_judge(toks):
    tok = toks["chatml"]
    assert check_pad("judge", loaded(tok)) == []
    same = variant(tok, pad_token=tok.eos_token)
    [f] = check_pad("judge", loaded(same, pad_token_id=same.eos_token_id))
    assert f.level == "error" and f.problem.startswith("pad == EOS ('<|im_end|>'")
    [f] = check_pad("judge", loaded(tok, pad_token_id=tok.eos_token_id))
    assert f.problem.startswith(f"config.json's pad_token_id={tok.eos_token_id} is not the tokenizer's pad")


def test_default_system_prompt_and_date(toks):
    chatml = TEMPLATES["chatml"]["chat_template"]
    default = ("{% if messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are Tiny, a helpful model.<|im_end|>\n' }}{% endif %}" + chatml)
    [f] = check_system_prompt("policy", variant(toks["chatml"], default))
    assert f.level == "note" and f.problem.endswith("'You are Tiny, a helpful model.'")
    assert check_system_prompt("policy", toks["chatml"]) == []
    dated = variant(toks["chatml"], "{{ strftime_now('%d %b %Y') }}" + chatml)
    assert [f.level for f in check_system_prompt("policy", dated)] == ["warning"]


def test_a_template_that_refuses_a_system_turn_is_a_warning(toks):
    chatml = TEMPLATES["chatml"]["chat_template"]
    strict = variant(toks["chatml"], "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
                     "not supported') }}{% endif %}" + chatml)
    [f] = check_system_prompt("policy", strict)
    assert f.level == "warning" and "refused the conversation: System role not supported" in f.problem


def test_templates_that_are_not_prefix_stable(toks):
    chatml = TEMPLATES["chatml"]["chat_template"]
    # the generation prompt opens the turn otherwise than the rendered assistant turn
    other_header = chatml.replace("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>bot\n' }}")
    [f] = check_prefix_stable("policy", variant(toks["chatml"], other_header))
    assert f.level == "error" and "not prefix-stable" in f.problem
    # earlier assistant turns shortened once a later turn follows (Qwen3-style)
    rewrites = chatml.replace("message['content']",
                              "(message['content'][:3] if message['role'] == 'assistant' and not loop.last "
                              "else message['content'])")
    [f] = check_prefix_stable("policy", variant(toks["chatml"], rewrites))
    assert f.level == "warning" and "re-renders earlier turns" in f.problem
    assert check_prefix_stable("judge", variant(toks["chatml"], rewrites), earlier_turns=False) == []
    assert check_prefix_stable("policy", toks["chatml"]) == []


def test_lengths_against_positions(toks):
    cfg = tiny_config(toks["chatml"], max_position_embeddings=512)
    found = check_lengths("policy", cfg, {"dpo.data.max_length": 2048, "generate.sampling.max_new_tokens": 512,
                                          "eval.sampling.max_new_tokens": 100},
                          room=("generate.sampling.max_new_tokens", "eval.sampling.max_new_tokens"))
    assert [str(f) for f in found] == [
        "policy: error: dpo.data.max_length=2048 is longer than the model's 512 positions -> "
        "set dpo.data.max_length below 512",
        "policy: error: generate.sampling.max_new_tokens=512 leaves no room for the prompt within the model's "
        "512 positions -> set generate.sampling.max_new_tokens below 512 minus the longest prompt"]


def test_a_judge_with_another_tokenizer_is_a_note(toks):
    [f] = check_same_tokenizer(toks["chatml"], toks["llama3"])
    assert f.level == "note" and "tokenizer" in f.problem and "chat template" in f.problem
    assert check_same_tokenizer(toks["chatml"], copy.deepcopy(toks["chatml"])) == []


# --------------------------------------------------------------------------- the loop and the CLI


def _loop_yaml(path, policy, judge, kind="bt", **extra):
    data = {"out": str(path.parent / "run"), "policy": {"path": str(policy)},
            "prompts": {"source": "prompts.jsonl"},
            "generate": {"sampling": {"max_new_tokens": 32}},
            "annotate": {"annotator": {"kind": kind, "path": str(judge), "max_length": 256}},
            "dpo": {"data": {"max_length": 256, "max_prompt_length": 128}}, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def test_rlhf_check(tiny_model, trained_rm, tmp_path, capsys):
    ok = _loop_yaml(tmp_path / "ok.yaml", tiny_model, trained_rm)
    assert main(["check", "--config", str(ok)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"check: policy {tiny_model}, reference pi_0, judge bt {trained_rm}: 0 error(s), "
                   "0 other finding(s)"]
    assert main(["check", "--config", str(ok), "dpo.data.max_length=4096",
                 "annotate.annotator.max_length=4096"]) == 2
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "policy: error: dpo.data.max_length=4096 is longer than the model's 512 positions" in lines[0]
    assert lines[1].startswith("reference: error: dpo.data.max_length=4096")
    assert lines[-1].endswith("3 error(s), 0 other finding(s)") and len(lines) == 4
    assert captured.err.strip() == "error: check: 3 error(s) above; fix them before the loop runs"


def test_rlhf_check_on_a_dpo_judge_wants_its_reference(tiny_model, other_judge, tmp_path, capsys):
    dpo = {"kind": "dpo", "path": str(tiny_model), "reference": str(tiny_model), "max_length": 256}
    ok = _loop_yaml(tmp_path / "ok.yaml", tiny_model, tiny_model, annotate={"annotator": dpo})
    assert main(["check", "--config", str(ok)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("judge dpo " + f"{tiny_model}: 0 error(s), 0 other finding(s)")
    assert main(["check", "--config", str(ok), f"annotate.annotator.reference={other_judge}"]) == 2
    assert f"judge: error: its reference {other_judge} has another tokenizer" in capsys.readouterr().out


@pytest.fixture(scope="module")
def other_judge(tmp_path_factory):
    """A BT judge with its own tokenizer (Llama-3 template, 400 tokens) and random weights."""
    out = tmp_path_factory.mktemp("judge")
    tok = train_tokenizer(corpus()[:800], vocab_size=400, template="llama3")
    cfg = LlamaConfig(**tiny_config(tok, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
                      .to_dict())
    cfg.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_annotate_renders_each_response_with_the_judges_template(tiny_model, other_judge, tmp_path):
    """The policy (ChatML, 600 tokens) samples; the judge (Llama-3 template, 400 tokens) scores
    each response text under its own template: the rewards are the judge read on its own
    rendering of prompt + response, tokenized by its own tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_workflow.generation.hf import generate_hf
    from rlhf_workflow.online.annotate import AnnotateConfig, AnnotatorConfig, run_annotate

    policy, policy_tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Sort: 3 1 2"}]]
    samples = generate_hf(policy, policy_tok, prompts, SamplingConfig(n=2, max_new_tokens=12, seed=1), progress=False)
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text("".join(json.dumps({"id": str(k), "prompt": p, "responses": [s.text for s in group]}) + "\n"
                                for k, (p, group) in enumerate(zip(prompts, samples, strict=True))))
    out = tmp_path / "scored.jsonl"
    run_annotate(AnnotateConfig(input=str(rollouts), out=str(out),
                                annotator=AnnotatorConfig(path=str(other_judge), kind="bt", max_length=256)))
    got = [r for line in out.read_text().splitlines() for r in json.loads(line)["rewards"]]

    judge, judge_tok = (AutoModelForSequenceClassification.from_pretrained(other_judge),
                        AutoTokenizer.from_pretrained(other_judge))
    want, same_ids = [], []
    for p, group in zip(prompts, samples, strict=True):
        for s in group:
            text = judge_tok.apply_chat_template(p + [{"role": "assistant", "content": s.text}], tokenize=False)
            assert text.startswith("<|begin_of_text|><|start_header_id|>user")  # the judge's own template
            ids = judge_tok(text, add_special_tokens=False)["input_ids"]
            if s.text:
                same_ids.append(judge_tok(s.text, add_special_tokens=False)["input_ids"]
                                == policy_tok(s.text, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                want.append(judge(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert got == pytest.approx(want, abs=1e-5)
    assert same_ids and not any(same_ids)  # the same texts are other token ids for the two tokenizers

    cfg = load_config(LoopConfig, _loop_yaml(tmp_path / "loop.yaml", tiny_model, other_judge))
    notes = [f for f in check_loop(cfg) if f.who == "judge"]
    assert levels(notes) == [("judge", "note")] and "chat template differ" in notes[0].problem


def test_rlhf_check_imports_each_reward_function_of_a_combined_judge(tiny_model, trained_rm, tmp_path, capsys):
    checker = "rlhf_workflow.reward.functions:exact_answer"
    judge = {"combine": [{"kind": "bt", "path": str(trained_rm), "max_length": 256},
                         {"kind": "function", "function": checker, "weight": 0.5}]}
    ok = _loop_yaml(tmp_path / "ok.yaml", tiny_model, trained_rm, annotate={"annotator": judge})
    assert main(["check", "--config", str(ok)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        f"judge 1 x bt {trained_rm} + 0.5 x function {checker}: 0 error(s), 0 other finding(s)")
    judge["combine"][1]["function"] = "rlhf_workflow.reward.functions:no_such_checker"
    bad = _loop_yaml(tmp_path / "bad.yaml", tiny_model, trained_rm, annotate={"annotator": judge})
    assert main(["check", "--config", str(bad)]) == 2
    assert ("judge: error: annotator.function rlhf_workflow.reward.functions:no_such_checker: cannot import it "
            "(AttributeError") in capsys.readouterr().out
