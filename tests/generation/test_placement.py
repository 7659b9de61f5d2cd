import pytest

from rlhf_workflow.errors import UserError
from rlhf_workflow.generation.placement import engine_groups, visible_devices

UUIDS = ["GPU-8f3c1a2b-0000-1111-2222-333344445555", "GPU-0a1b2c3d-6666-7777-8888-999900001111"]


def test_devices_are_cut_into_consecutive_groups_of_the_tp_size():
    assert engine_groups(["0", "1", "2", "3"], 2) == [["0", "1"], ["2", "3"]]
    assert engine_groups(["0", "1", "2", "3"], 4) == [["0", "1", "2", "3"]]
    assert engine_groups(["4", "5", "6", "7"], 1) == [["4"], ["5"], ["6"], ["7"]]  # physical ids, not 0..3


def test_uuids_are_kept_as_given():
    assert engine_groups(UUIDS, 1) == [[UUIDS[0]], [UUIDS[1]]]
    assert engine_groups(UUIDS, 2) == [UUIDS]


def test_engines_takes_the_first_groups():
    assert engine_groups(["4", "5", "6", "7"], 2, engines=1) == [["4", "5"]]
    assert engine_groups(["4", "5", "6", "7"], 1, engines=3) == [["4"], ["5"], ["6"]]
    assert engine_groups(["4", "5", "6", "7"], 2, engines=0) == [["4", "5"], ["6", "7"]]  # 0: all that fit


@pytest.mark.parametrize(("visible", "tp", "engines", "says"), [
    (["0", "1", "2", "3"], 3, 0, "the 4 visible GPU(s) (0,1,2,3) do not split into engines of "
                                 "vllm.tensor_parallel_size=3"),
    (["0", "1", "2", "3"], 2, 3, "vllm.engines=3 engines of vllm.tensor_parallel_size=2 need 6 GPUs, 4 are visible"),
    (["0", "1", "2", "3"], 1, 5, "vllm.engines=5"),
    ([], 1, 0, "no GPU is visible"),
])
def test_impossible_placements_are_one_line_errors(visible, tp, engines, says):
    with pytest.raises(UserError) as e:
        engine_groups(visible, tp, engines)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_visible_devices_read_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert visible_devices() == ["4", "5", "6", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f" {UUIDS[0]} ,{UUIDS[1]},")  # stripped, empty entry dropped
    assert visible_devices() == UUIDS
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_devices() == []  # set but empty: no GPU, whatever torch would count


def test_visible_devices_without_the_variable_are_torchs_indices(monkeypatch):
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert visible_devices() == ["0", "1", "2"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert visible_devices() == []
