import torch

from rlhf_workflow.data.batching import collate_rows, plan_batches
from rlhf_workflow.models.attention import attention_mask


def _flatten(plan):
    return [i for mb in plan for row in mb for i in row]


def test_plan_is_a_seeded_permutation():
    lengths = [5 + (i * 7) % 40 for i in range(100)]
    a = plan_batches(lengths, 4, 2, seed=1, epoch=0)
    assert sorted(_flatten(a)) == list(range(100))
    assert a == plan_batches(lengths, 4, 2, seed=1, epoch=0)
    assert a != plan_batches(lengths, 4, 2, seed=1, epoch=1)
    assert a != plan_batches(lengths, 4, 2, seed=2, epoch=0)


def test_length_grouping_cuts_padding_and_keeps_step_contents():
    lengths = [1 + (i * 37) % 200 for i in range(512)]

    def padding(plan):
        return sum(len(mb) * max(lengths[r[0]] for r in mb) - sum(lengths[r[0]] for r in mb) for mb in plan)

    grouped = plan_batches(lengths, 8, 1, seed=0, epoch=0, group_by_length=True)
    plain = plan_batches(lengths, 8, 1, seed=0, epoch=0, group_by_length=False)
    assert padding(grouped) < padding(plain) / 3
    # 8 x 1 and 2 x 4 put the same examples in each optimizer step
    big = plan_batches(lengths, 8, 1, seed=0, epoch=0)
    small = plan_batches(lengths, 2, 4, seed=0, epoch=0)
    for s in range(len(big)):
        assert sorted(_flatten(big[s : s + 1])) == sorted(_flatten(small[4 * s : 4 * s + 4]))


def test_packing_fills_rows_without_overflow():
    lengths = [3 + (i * 11) % 60 for i in range(300)]
    plan = plan_batches(lengths, 4, 1, seed=0, epoch=0, pack_length=128)
    rows = [row for mb in plan for row in mb]
    assert sorted(i for r in rows for i in r) == list(range(300))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert sum(lengths) / (128 * len(rows)) > 0.85  # dense


def test_collate_positions_restart_and_block_diagonal_mask():
    rows = [[([1, 2, 3], [2, 3, -100]), ([4, 5], [5, -100])], [([6], [-100])]]
    b = collate_rows(rows, pad_id=0, pad_to_multiple=8)
    assert b["input_ids"].shape == (2, 8)
    assert b["position_ids"][0, :5].tolist() == [0, 1, 2, 0, 1]
    assert b["seq_ids"][0].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    m = attention_mask(b, "sdpa", torch.float32)[0, 0]
    assert m[3, :3].tolist() == [False, False, False]  # sequence 2 cannot see sequence 1
    assert m[4, 3] and m[2, 0] and not m[0, 1]  # causal within a sequence
    assert m[6].tolist() == [False] * 6 + [True, False]  # padding sees itself only (no empty softmax row)
    eager = attention_mask(b, "eager", torch.bfloat16)  # the additive form: 0 where seen, the dtype's min elsewhere
    assert eager.dtype == torch.bfloat16 and torch.equal(eager == 0, attention_mask(b, "sdpa", torch.float32))
    assert (eager[eager != 0] == torch.finfo(torch.bfloat16).min).all()
    assert attention_mask(b, "flash_attention_2", torch.float32) is None  # the positions carry the sequences
    # targets: from the first column holding one, flat indices into the rest
    assert b["target_start"] == 0 and b["target_at"].tolist() == [0, 1, 3]
    alone = collate_rows([[([1, 2, 3], [2, 3, -100])]], pad_id=0, pad_to_multiple=1)
    assert attention_mask(alone, "sdpa", torch.float32).tolist() == [[1, 1, 1]]  # one sequence: padding only
