"""Sampling on the `hf` backend against plain ``model.generate``: the same model, prompts, n,
temperature and token budget.

    python benchmarks/generate_hf.py [--prompts 64] [--n 8] [--max-new-tokens 48] [--size small]

Ours: :func:`rlhf_workflow.generation.hf.generate_hf` (prompts sorted by length into batches of
``--batch-size``, each prompt's KV cache computed once and shared by its n samples). The peer:
what a script does by hand, ``model.generate(prompt, num_return_sequences=n)`` one prompt at a
time. Both sample at temperature 1 from a random tiny Llama (so responses run to the budget or
to a random end of turn); tokens/s counts the generated tokens each side kept (up to and
including the end of turn), over the sampling time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from dpo_vs_trl import SIZES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16, help="our prompts per generate call")
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    args = p.parse_args()

    from rlhf_workflow.config import ModelConfig
    from rlhf_workflow.data.chat import encode_prompt
    from rlhf_workflow.generation.hf import generate_hf
    from rlhf_workflow.generation.sampling import SamplingConfig, stop_token_ids
    from rlhf_workflow.models.loading import load_model, load_tokenizer
    from rlhf_workflow.models.tiny import InitModelConfig, init_model
    from rlhf_workflow.sandbox import make_prompts

    root = Path(tempfile.mkdtemp(prefix="gen-bench-"))
    path = str(init_model(InitModelConfig(out=str(root / "model"), **SIZES[args.size])))
    model, tok = load_model(ModelConfig(path=path)).eval(), load_tokenizer(ModelConfig(path=path))
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in make_prompts(args.prompts, seed=3)]
    cfg = SamplingConfig(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

    t0 = time.perf_counter()
    ours = generate_hf(model, tok, prompts, cfg, progress=False)
    ours_s = time.perf_counter() - t0
    ours_tokens = sum(len(s.token_ids) for group in ours for s in group)

    stops = stop_token_ids(model.generation_config, tok)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    plain_tokens = 0
    with torch.no_grad():
        for messages in prompts:
            ids = torch.tensor([encode_prompt(tok, messages)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=None, top_p=None, num_return_sequences=args.n,
                                 max_new_tokens=args.max_new_tokens, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
            for row in out.tolist():
                plain_tokens += next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    plain_s = time.perf_counter() - t0

    params = sum(q.numel() for q in model.parameters())
    print(f"{args.size}: {params / 1e6:.1f}M params, {args.prompts} prompts x {args.n} samples, up to "
          f"{args.max_new_tokens} new tokens, threads {torch.get_num_threads()}")
    for name, s, n in (("ours", ours_s, ours_tokens), ("generate", plain_s, plain_tokens)):
        print(f"{name:9} {s:7.1f} s {n:7d} tokens {n / s:8.1f} tokens/s")
    print(f"tokens/s ratio ours / plain generate: {(ours_tokens / ours_s) / (plain_tokens / plain_s):.2f}x")


if __name__ == "__main__":
    main()
