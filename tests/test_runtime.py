"""fastkern/runtime.py: path_for's per-device-type cache follows every setting change after it was filled."""

import contextvars
import threading

import pytest
import torch

from fastkern import runtime
from fastkern.ops import _common, glu


@pytest.fixture
def fresh_paths():
    """An empty cache before and after the test, so a test's monkeypatched answers do not leak."""
    runtime.refresh_paths()
    yield
    runtime.refresh_paths()


def _filled(device_type="cpu") -> str:
    path = runtime.path_for(torch.empty(0, device="meta") if device_type == "meta" else torch.empty(0))
    assert runtime._PATHS[device_type] == path  # the cache now answers
    return path


def test_force_reference_takes_effect_after_the_cache_is_filled(fresh_paths):
    assert _filled() == "interpreter"  # tests run with TRITON_INTERPRET=1 (tests/conftest.py)
    with runtime.force_reference():
        assert runtime.path_for(torch.empty(0)) == "reference"
        assert _common.op_path(torch.empty(0, dtype=torch.bfloat16)) == "reference"
        with runtime.force_reference(False):  # nested opt-out
            assert runtime.path_for(torch.empty(0)) == "interpreter"
        assert runtime.path_for(torch.empty(0)) == "reference"
    assert runtime.path_for(torch.empty(0)) == "interpreter"  # and the cache is untouched by it


def test_force_reference_switches_an_op_after_the_cache_is_filled(fresh_paths, monkeypatch):
    """An op that launched its kernel once (cache filled) takes the reference inside force_reference,
    and the kernel again after it."""
    launches = []
    launch = glu._launch_forward

    def counted(*args, **kwargs):
        launches.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(glu, "_launch_forward", counted)
    g, u = torch.randn(3, 8), torch.randn(3, 8)
    expected = torch.nn.functional.silu(g) * u
    torch.testing.assert_close(glu.swiglu(g, u), expected)
    assert launches == [1] and runtime._PATHS["cpu"] == "interpreter"
    with runtime.force_reference():
        torch.testing.assert_close(glu.swiglu(g, u), expected)
    assert launches == [1]  # the reference ran: no launch
    glu.swiglu(g, u)
    assert launches == [1, 1]


def test_force_reference_is_per_context_with_a_filled_cache(fresh_paths):
    _filled()
    seen = {}

    def other_thread():
        seen["thread"] = runtime.path_for(torch.empty(0))

    with runtime.force_reference():
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        seen["copied context"] = contextvars.copy_context().run(runtime.path_for, torch.empty(0))
    assert seen == {"thread": "interpreter", "copied context": "reference"}


def test_cache_is_per_device_type(fresh_paths):
    assert _filled("cpu") == "interpreter"
    assert _filled("meta") == "reference"  # neither Triton nor its interpreter runs meta tensors
    assert runtime.path_for(torch.empty(0)) == "interpreter"


def test_refresh_paths_sees_a_changed_interpreter_switch(fresh_paths, monkeypatch):
    assert _filled() == "interpreter"
    monkeypatch.setattr(runtime, "interpreter_active", lambda: False)
    assert runtime.path_for(torch.empty(0)) == "interpreter"  # cached until refreshed (documented)
    runtime.refresh_paths()
    assert runtime.path_for(torch.empty(0)) == "reference"  # CPU tensors without the interpreter
    monkeypatch.undo()
    runtime.refresh_paths()
    assert runtime.path_for(torch.empty(0)) == "interpreter"


def test_refresh_paths_sees_triton_become_unavailable(fresh_paths, monkeypatch):
    assert _filled() == "interpreter"
    monkeypatch.setattr(runtime, "triton_available", lambda: False)
    runtime.refresh_paths()
    assert runtime.path_for(torch.empty(0)) == "reference"
