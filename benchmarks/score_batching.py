"""Reward-model scoring throughput: length-sorted batches versus the input order.

    python benchmarks/score_batching.py [--prompts 200] [--n 8] [--batch 32] [--repeats 3]

Rollouts as the online loop makes them (n responses per prompt) with mixed lengths: each
response has 0 to 40 filler sentences before its answer, so lengths range from a few to
a few hundred tokens. The same reward model (a random tiny Llama with a score head and a
dedicated pad token) scores them with ``rlhf_workflow.reward.bt.score`` at the same batch
size, once in the input order and once in length-sorted batches (order restored after).
Reported: responses/s (best of ``--repeats``), padded tokens per real token, and the largest
difference between the two sets of rewards (padding must not change a reward).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from rlhf_workflow.config import ModelConfig
from rlhf_workflow.models.tiny import InitModelConfig, init_model
from rlhf_workflow.reward.bt import load_seq_cls, score
from rlhf_workflow.reward.encoding import encode, ensure_pad_token
from rlhf_workflow.sandbox import make_prompts
from rlhf_workflow.sandbox.tasks import FILLERS, render_response


def rollouts(n_prompts: int, n: int, seed: int = 0) -> tuple[list[list[dict]], list[str]]:
    rng = random.Random(seed)
    prompts, responses = [], []
    for p in make_prompts(n_prompts, seed):
        for _ in range(n):
            k = rng.choice([0, 0, 1, 2, 3, 5, 10, 20, 40])
            prompts.append([{"role": "user", "content": p["prompt"]}])
            responses.append(render_response(p["meta"]["answer"], rng.choices(FILLERS, k=k)))
    return prompts, responses


def padding_ratio(lengths: list[int], batch: int, sort: bool) -> float:
    order = (
        sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if sort
        else list(range(len(lengths)))
    )
    padded = sum(
        max(lengths[i] for i in order[b : b + batch]) * len(order[b : b + batch])
        for b in range(0, len(order), batch)
    )
    return padded / sum(lengths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    path = init_model(InitModelConfig(out=tempfile.mkdtemp(prefix="score-bench-") + "/model"))
    spec = ModelConfig(path=str(path))
    from rlhf_workflow.models.loading import load_tokenizer

    tok = load_tokenizer(spec)
    torch.manual_seed(0)
    model, _ = load_seq_cls(spec)
    ensure_pad_token(model, tok)
    model.eval()
    prompts, responses = rollouts(a.prompts, a.n)
    lengths = [
        len(encode(tok, q, [{"role": "assistant", "content": r}], 2048)[0].input_ids)
        for q, r in zip(prompts, responses, strict=True)
    ]
    print(
        f"{len(responses)} responses, {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.0f}), batch {a.batch}, "
        f"{torch.get_num_threads()} threads"
    )
    results = {}
    for sort in (False, True) * a.repeats:
        t = time.perf_counter()
        r = score(model, tok, prompts, responses, a.batch, progress=False, sort_by_length=sort)
        dt = time.perf_counter() - t
        key = "length-sorted" if sort else "input order"
        if key not in results or dt < results[key][0]:
            results[key] = (dt, r)
    diff = max(
        abs(x - y)
        for x, y in zip(results["input order"][1], results["length-sorted"][1], strict=True)
    )
    print(f"{'':>14} {'responses/s':>12} {'padded/real tokens':>19}")
    for key, (dt, _) in results.items():
        ratio = padding_ratio(lengths, a.batch, key == "length-sorted")
        print(f"{key:>14} {len(responses) / dt:>12.1f} {ratio:>19.2f}")
    speed = results["input order"][0] / results["length-sorted"][0]
    print(f"speed-up: {speed:.2f}x; largest reward difference between the two: {diff:.2e}")


if __name__ == "__main__":
    main()
