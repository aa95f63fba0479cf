"""fastkern/ops/_common.py: the launch device guard."""

import contextlib

import pytest

import torch

from fastkern.ops import _common


class _FakeCudaTensor:
    is_cuda = True

    def __init__(self, index):
        self.index = index

    def get_device(self):
        return self.index


def test_device_guard_enters_the_tensors_device_only_when_it_is_not_current(monkeypatch):
    entered = []

    class Recorder(contextlib.AbstractContextManager):
        def __init__(self, index):
            entered.append(index)

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(_common, "_several_gpus", None)  # as before the first CUDA launch
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with _common.device_guard(_FakeCudaTensor(0)):
        pass
    assert entered == []  # already current: no switch
    with _common.device_guard(_FakeCudaTensor(1)):
        pass
    assert entered == [1]  # another GPU: switch to it for the launch


def test_device_guard_skips_the_device_query_with_one_gpu(monkeypatch):
    def no_query(*args, **kwargs):
        raise AssertionError("with one GPU a launch must not query or switch the CUDA device")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(_common, "_several_gpus", None)
    monkeypatch.setattr(torch.cuda, "current_device", no_query)
    monkeypatch.setattr(torch.cuda, "device", no_query)
    for _ in range(2):
        guard = _common.device_guard(_FakeCudaTensor(0))
        assert isinstance(guard, contextlib.nullcontext)
    assert _common._several_gpus is False


def test_device_guard_is_a_no_op_for_cpu_tensors(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU launch must not query or switch the CUDA device")

    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    guard = _common.device_guard(torch.empty(2))
    assert isinstance(guard, contextlib.nullcontext)
    assert _common.device_guard(torch.empty(3)) is guard  # one shared guard: nothing is built per launch
    for _ in range(2):  # the shared guard can be entered again
        with guard as entered:
            assert entered is None


def test_dtensor_argument_is_refused_by_name():
    """A sharded parameter reaching an op directly gets a fastkern error naming the argument, not torch's
    mixed Tensor/DTensor dispatch error from deep inside."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fastkern.ops import rms_norm

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = distribute_tensor(torch.ones(8), mesh, [Shard(0)])
        with pytest.raises(TypeError, match="`weight` is a DTensor"):
            rms_norm(torch.randn(3, 8), weight, 1e-6)
    finally:
        if created:
            dist.destroy_process_group()


def test_output_buffers_are_poisoned_in_tests_and_the_switch_restores():
    """The suite runs with output poisoning on (tests/conftest.py), so an element a kernel leaves
    unwritten is NaN (integers: the sentinel); switched off, output_buffer is a plain torch.empty."""
    assert torch.isnan(_common.output_buffer((3, 5), torch.float32, "cpu")).all()
    assert torch.isnan(_common.output_buffer(4, torch.bfloat16, "cpu")).all()
    assert (_common.output_buffer(4, torch.int32, "cpu") == _common.POISON_INT).all()
    assert _common.output_buffer((0, 7), torch.float32, "cpu").shape == (0, 7)
    previous = _common.set_output_poisoning(False)
    try:
        assert previous is True
        out = _common.output_buffer((2, 3), torch.float16, "cpu")
        assert out.shape == (2, 3) and out.dtype == torch.float16
    finally:
        _common.set_output_poisoning(previous)
    assert torch.isnan(_common.output_buffer(2, torch.float32, "cpu")).all()


def test_output_poisoning_is_off_by_default():
    import subprocess
    import sys

    code = "import fastkern.ops._common as c; print(c._poison_outputs)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_an_unwritten_output_element_fails_the_oracle():
    """What the poisoning is for: a kernel that skips the last element returns NaN there, and the oracle
    comparison (NaN never passes) fails."""
    from tests.oracle import assert_close

    x = torch.randn(5)
    out = _common.output_buffer(x.shape, x.dtype, x.device)
    out[:-1] = x[:-1] * 2  # a "kernel" that forgets the last element
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(out, x.double() * 2, torch.float32)
