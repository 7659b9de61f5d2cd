"""Peak memory and time of the chunked log-prob primitive vs the full-vocabulary computation.

The part of a training step this measures: final hidden states (tokens x hidden) -> LM head ->
fp32 log-softmax -> the targets' log-probs, forward and backward. The naive version
materialises (tokens x vocab) logits, their fp32 log-softmax and its gradient; ours
(``rlhf_workflow.models.logprobs.head_logps``) holds one chunk of logits at a time, either in
one head call with the chunks looped inside it (``chunked``: a plain linear head) or one head
call per chunk under activation checkpointing (``per_chunk``: the path a wrapped head takes).
Each variant runs in a fresh process; peak memory is the growth of the process's
high-water mark (RSS) over what the inputs and the head already take.

    python benchmarks/logprobs_memory.py --vocab 128256 --hidden 1024 --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run(variant: str, vocab: int, hidden: int, tokens: int) -> dict:
    import psutil
    import torch
    from transformers import LlamaConfig

    from rlhf_workflow.models.logprobs import head_logps

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    class Wrapped(torch.nn.Linear):  # a head with a forward of its own, as a LoRA layer
        def forward(self, x):
            return super().forward(x)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = (Wrapped if variant == "per_chunk" else torch.nn.Linear)(hidden, vocab, bias=False)
            self.config = LlamaConfig(vocab_size=vocab, hidden_size=hidden)

        def get_output_embeddings(self):
            return self.lm_head

    model = Model()
    h = torch.randn(tokens, hidden, requires_grad=True)
    t = torch.randint(0, vocab, (tokens,))
    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if variant == "naive":
        logps = torch.log_softmax(model.lm_head(h).float(), -1).gather(-1, t[:, None])[:, 0]
    else:
        logps = head_logps(model, h, t)
    (-logps.sum()).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"variant": variant, "seconds": round(seconds, 2), "peak_extra_mib": round((peak - base) / 2**20),
            "loss": float(-logps.sum()), "grad_norm": float(h.grad.norm())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run(a.variant, a.vocab, a.hidden, a.tokens)))
        return
    rows = {}
    for variant in ("naive", "chunked", "per_chunk"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--vocab", str(a.vocab),
                              "--hidden", str(a.hidden), "--tokens", str(a.tokens)],
                             capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    n, c, k = rows["naive"], rows["chunked"], rows["per_chunk"]
    print(f"vocab {a.vocab}, hidden {a.hidden}, {a.tokens} target tokens, forward + backward")
    print(f"{'':9} {'peak MiB':>9} {'seconds':>8} {'loss':>14} {'grad norm':>10}")
    for v in (n, c, k):
        print(f"{v['variant']:9} {v['peak_extra_mib']:>9} {v['seconds']:>8} {v['loss']:>14.2f} {v['grad_norm']:>10.4f}")
    print(f"memory ratio naive / chunked: {n['peak_extra_mib'] / max(c['peak_extra_mib'], 1):.1f}x, "
          f"time ratio chunked / naive: {c['seconds'] / n['seconds']:.2f}x, "
          f"loss difference {abs(n['loss'] - c['loss']) / abs(n['loss']):.1e} (relative); "
          f"per-chunk calls / one call: time {k['seconds'] / c['seconds']:.2f}x, memory "
          f"{k['peak_extra_mib'] / max(c['peak_extra_mib'], 1):.2f}x")


if __name__ == "__main__":
    main()
