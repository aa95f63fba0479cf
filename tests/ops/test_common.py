"""fastkern/ops/_common.py: the launch device guard."""

import contextlib

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

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with _common.device_guard(_FakeCudaTensor(0)):
        pass
    assert entered == []  # already current: no switch
    with _common.device_guard(_FakeCudaTensor(1)):
        pass
    assert entered == [1]  # another GPU: switch to it for the launch


def test_device_guard_is_a_no_op_for_cpu_tensors():
    guard = _common.device_guard(torch.empty(2))
    with guard:
        pass
    with guard:  # the shared no-op guard can be entered again
        pass
