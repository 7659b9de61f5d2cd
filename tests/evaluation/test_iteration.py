import pytest
import torch

from rlhf_workflow.config import ModelConfig
from rlhf_workflow.data.chat import encode_prompt
from rlhf_workflow.evaluation.iteration import sample_logps
from rlhf_workflow.generation.hf import generate_hf
from rlhf_workflow.generation.sampling import SamplingConfig
from rlhf_workflow.models.loading import load_model, load_tokenizer


def test_sample_logps_equal_an_unbatched_computation(tiny_model):
    """The KL estimate's ingredient: log pi(y|x) of the sampled tokens, batched and padded,
    equals the sum of next-token log-probs of each sample computed alone."""
    spec = ModelConfig(path=str(tiny_model))
    model, tok = load_model(spec).eval(), load_tokenizer(spec)
    prompts = [[{"role": "user", "content": q}] for q in ("What is 3 + 5?", "Sort: 9 1 4 2 7")]
    samples = generate_hf(model, tok, prompts, SamplingConfig(n=3, max_new_tokens=7), progress=False)
    flat_p = [p for p, g in zip(prompts, samples, strict=True) for _ in g]
    flat_s = [s for g in samples for s in g]
    got = sample_logps(model, tok, flat_p, flat_s, batch_size=4)
    for p, s, value in zip(flat_p, flat_s, got, strict=True):
        prompt = encode_prompt(tok, p)
        ids = torch.tensor([prompt + list(s.token_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        expected = sum(logp[len(prompt) - 1 + t, tok_id].item() for t, tok_id in enumerate(s.token_ids))
        assert value == pytest.approx(expected, abs=1e-4)


def test_selection_gold_measures_the_winners_curse():
    """Gold of the judge's chosen and rejected responses against the best and the mean gold of
    the n, on hand-computed sandbox responses; a prompt without a pair does not count."""
    from rlhf_workflow.data.records import Rollout
    from rlhf_workflow.evaluation.iteration import selection_gold
    from rlhf_workflow.sandbox.rewards import gold_rewards

    meta = {"skill": "add", "a": 2, "b": 3, "answer": "5"}
    responses = ["Answer: 5", "Answer: 4", "I will work it out. Answer: 5"]  # gold 1, 0, 1 - 0.02 * 5
    ro = [Rollout(id="a", prompt="What is 2 + 3?", responses=responses, meta=meta),
          Rollout(id="b", prompt="What is 2 + 3?", responses=responses[:2], meta=meta)]
    pairs = [("l1", {"id": "a", "meta": {"chosen_index": 2, "rejected_index": 1}})]  # the judge liked filler
    gold = {r.id: g for r, g in zip(ro, gold_rewards(ro), strict=True)}
    got = selection_gold(gold, pairs)
    assert got == pytest.approx({"chosen_gold": 0.9, "rejected_gold": 0.0, "best_gold": 1.0,
                                 "rollout_gold": (1 + 0 + 0.9) / 3})
    assert selection_gold(gold, []) == {}


def test_the_evaluation_stage_on_two_ranks_gives_one_process_metrics(tiny_model, trained_rm, sandbox_data, tmp_path):
    """``rlhf eval iteration`` on 2 ranks (each a copy of the policy, the reference and the
    judge): the sampling (batch by batch, each with its own seed), the KL log-probs and the
    judge's scoring are shared out, and metrics.json is the one-process file."""
    import json
    import subprocess
    import sys

    from rlhf_workflow.cli import main

    args = ["eval", "iteration", "iteration=1", f"policy.path={tiny_model}", f"sft={tiny_model}",
            f"eval.prompts={sandbox_data / 'prompts_eval.jsonl'}", "eval.limit=10", "eval.sampling.n=3",
            "eval.sampling.max_new_tokens=8", "eval.sampling.batch_size=3", f"annotator.path={trained_rm}",
            "annotator.batch_size=4", "seed=5"]
    assert main([*args, f"out={tmp_path / 'one.json'}"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rlhf_workflow.cli", *args, f"out={tmp_path / 'two.json'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one.pop("processes") == 1 and two.pop("processes") == 2
    # the same samples and scores; the judge's floats to rounding (a rank's thread count changes
    # the order of a matrix product's sums)
    assert two.keys() == one.keys()
    for key, value in one.items():
        assert two[key] == (pytest.approx(value, rel=1e-6, abs=1e-7) if isinstance(value, float) else value), key
    assert one["gold_reward"] is not None and one["kl"] == 0.0 and one["eos_rate"] < 1  # policy == pi_0


def test_the_evaluation_of_samples_written_by_generate_equals_sampling_in_the_stage(tiny_model, trained_rm,
                                                                                     sandbox_data, tmp_path):
    """With the vLLM backend the loop samples the held-out prompts with ``rlhf generate``
    (token ids kept) and the stage evaluates those samples. Shown here with the transformers
    backend, where one chunk with the stage's seed gives the stage's own samples: same metrics."""
    import json

    from rlhf_workflow.cli import main
    from rlhf_workflow.data.readers import read_records
    from rlhf_workflow.data.records import Rollout

    prompts = sandbox_data / "prompts_eval.jsonl"
    sampling = ["sampling.n=3", "sampling.max_new_tokens=8", "sampling.batch_size=3", "sampling.seed=5"]
    assert main(["generate", f"model.path={tiny_model}", f"input={prompts}", "limit=10", "keep_token_ids=true",
                 f"out={tmp_path / 'samples.jsonl'}", *sampling]) == 0
    (ro,) = read_records(tmp_path / "samples.jsonl", Rollout)[:1]
    assert [len(ids) for ids in ro.token_ids] == ro.num_tokens
    args = ["eval", "iteration", f"policy.path={tiny_model}", f"sft={tiny_model}", f"eval.prompts={prompts}",
            "eval.limit=10", *(f"eval.{s}" for s in sampling[:3]), f"annotator.path={trained_rm}", "seed=5"]
    assert main([*args, f"out={tmp_path / 'here.json'}"]) == 0
    assert main([*args, f"rollouts={tmp_path / 'samples.jsonl'}", f"out={tmp_path / 'read.json'}"]) == 0
    here, read = (json.loads((tmp_path / f).read_text()) for f in ("here.json", "read.json"))
    assert read == here and here["mean_tokens"] > 1
    assert main([*args, f"rollouts={tmp_path / 'here.json'}", f"out={tmp_path / 'x.json'}"]) == 2  # not rollouts
