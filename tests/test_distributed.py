"""The batched-inference loop: batches longest first, results back in the caller's order."""

import torch

from rlhf_workflow.distributed import run_batched


def test_results_come_back_in_the_callers_order_from_length_sorted_batches():
    lengths = [3, 9, 1, 7, 7, 2, 8]
    seen = []

    def fn(idx):
        seen.append(idx)
        return torch.tensor([[10.0 * i, lengths[i]] for i in idx])

    out = run_batched(lengths, 3, fn, shard=False)
    assert out.tolist() == [[10.0 * i, n] for i, n in enumerate(lengths)]
    assert seen == [[1, 6, 3], [4, 0, 5], [2]]  # longest first, ties in input order
    assert run_batched(lengths, 3, lambda idx: torch.tensor(idx), sort=False).tolist() == list(range(7))
    assert run_batched([], 3, fn).numel() == 0
