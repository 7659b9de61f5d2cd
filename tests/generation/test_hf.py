import pytest

from rlhf_workflow.config import ModelConfig
from rlhf_workflow.generation.hf import _sample, generate_hf
from rlhf_workflow.generation.sampling import SamplingConfig
from rlhf_workflow.models.loading import load_model, load_tokenizer

PROMPTS = [[{"role": "user", "content": "What is 3 + 5?"}],
           [{"role": "user", "content": "Sort: 3 9 1 2"}],
           [{"role": "user", "content": "Which is larger: 37 or 52? Answer quickly."}]]


@pytest.fixture(scope="module")
def policy(tiny_model):
    spec = ModelConfig(path=str(tiny_model))
    return load_model(spec), load_tokenizer(spec)


def test_results_keep_prompt_order_and_count(policy):
    model, tok = policy
    cfg = SamplingConfig(n=1, temperature=0, max_new_tokens=6, batch_size=2)
    fwd = generate_hf(model, tok, PROMPTS, cfg, progress=False)
    rev = generate_hf(model, tok, PROMPTS[::-1], cfg, progress=False)
    assert [s[0].text for s in fwd] == [s[0].text for s in rev[::-1]]  # order restored
    many = generate_hf(model, tok, PROMPTS, SamplingConfig(n=4, max_new_tokens=6, batch_size=2), progress=False)
    assert [len(s) for s in many] == [4, 4, 4]
    assert all(x.num_tokens <= 6 and x.finish_reason in ("stop", "length") for s in many for x in s)


def test_sampling_is_seeded(policy):
    model, tok = policy
    cfg = SamplingConfig(n=3, max_new_tokens=8, seed=5)
    a = generate_hf(model, tok, PROMPTS, cfg, progress=False)
    b = generate_hf(model, tok, PROMPTS, cfg, progress=False)
    c = generate_hf(model, tok, PROMPTS, cfg.model_copy(update={"seed": 6}), progress=False)
    assert a == b and a != c


def test_finish_reason_and_token_count(policy):
    _, tok = policy
    eos = tok.eos_token_id
    word = tok("Answer: 8", add_special_tokens=False)["input_ids"]
    stopped = _sample(tok, word + [eos, tok.pad_token_id], [eos], budget=10)
    assert stopped.text == "Answer: 8" and stopped.finish_reason == "stop"
    assert stopped.num_tokens == len(word) + 1  # the end-of-turn token counts
    cut = _sample(tok, word, [eos], budget=len(word))
    assert cut.finish_reason == "length" and cut.num_tokens == len(word)


def test_samples_share_the_prompt_prefill(policy, monkeypatch):
    """The prompt is run once per prompt, not once per sample, and results are unchanged."""
    import rlhf_workflow.generation.hf as hf

    model, tok = policy
    cfg = SamplingConfig(n=4, max_new_tokens=6, seed=3)
    shared = generate_hf(model, tok, PROMPTS, cfg, progress=False)
    rows = []
    real = hf._shared_prefill
    monkeypatch.setattr(hf, "_shared_prefill", lambda m, ids, mask, c: rows.append(len(ids)) or real(m, ids, mask, c))
    again = generate_hf(model, tok, PROMPTS, cfg, progress=False)
    assert rows == [3] and again == shared  # one prefill row per prompt
    monkeypatch.setattr(hf, "_shared_prefill", lambda *a: None)  # the unshared path
    assert generate_hf(model, tok, PROMPTS, cfg, progress=False) == shared


def test_extra_stop_token_ids_and_strings(policy):
    model, tok = policy
    greedy = SamplingConfig(n=1, temperature=0, max_new_tokens=8)
    free = generate_hf(model, tok, PROMPTS[:1], greedy, progress=False)[0][0]
    first, third = free.token_ids[0], free.token_ids[2]
    by_id = generate_hf(model, tok, PROMPTS[:1], greedy.model_copy(update={"stop_token_ids": [third]}),
                        progress=False)[0][0]
    assert free.finish_reason == "length" and third not in free.token_ids[:2] and first != third
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[:3]
    stop_text = tok.decode(free.token_ids[2:4])
    assert stop_text.strip() and stop_text not in tok.decode(free.token_ids[:2])
    by_str = generate_hf(model, tok, PROMPTS[:1], greedy.model_copy(update={"stop": [stop_text]}),
                         progress=False)[0][0]
    assert by_str.finish_reason == "stop" and by_str.text == free.text[: free.text.find(stop_text)]
    assert len(by_str.token_ids) <= 4
