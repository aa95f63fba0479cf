"""Test setup: Triton interpreter on CPU-only machines, Hypothesis profiles, poisoned outputs.

Every kernel test in CI runs the real Triton kernel through Triton's interpreter. The variable must
be set before triton is imported, which is why it is set here, before fastkern is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

from fastkern.demo_common import quiet_bitsandbytes_cpu_notice  # noqa: E402
from fastkern.ops import _common as ops_common  # noqa: E402
from tests.profiles import register_profiles  # noqa: E402

# bitsandbytes logs, at import on every CPU run, that its optional hub CPU kernel did not load; it then
# runs its built-in CPU code, which is what the tests exercise anyway. Only that one message is dropped.
quiet_bitsandbytes_cpu_notice()

# ci (default), dev, gpu: see tests/profiles.py; a test that sets its own count uses tests.profiles.bounded,
# which scales it with the profile pytest loads (--hypothesis-profile).
register_profiles()
settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="session")
def poisoned_outputs():
    """Every test runs with output poisoning on (fastkern.ops._common.set_output_poisoning): each buffer an
    op allocates for a kernel to fill starts as NaN (integers: a sentinel), so an element a kernel forgets
    to write fails the comparison instead of passing with whatever the allocator left there.
    Session-scoped, so Hypothesis sees no function-scoped fixture on every property test."""
    previous = ops_common.set_output_poisoning(True)
    yield
    ops_common.set_output_poisoning(previous)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.device_count() < 2:
        skip_multi = pytest.mark.skip(reason="needs 2 CUDA devices: run `pytest -m multigpu` on a 2-GPU machine")
        for item in items:
            if "multigpu" in item.keywords:
                item.add_marker(skip_multi)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run `pytest -m gpu` on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_empty(monkeypatch):
    """Also fill every new torch.empty* allocation (any caller's, not only the ops' output buffers) with
    NaN (floats) or a sentinel (ints). The global poisoning (poisoned_outputs) covers the buffers the ops
    allocate through fastkern.ops._common.output_buffer; this fixture also covers the ops that still
    allocate with torch.empty* directly (rope, lora_linear, nf4_matmul) and scratch tensors."""
    def poisoned(fn):
        def wrapper(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.numel():
                if t.dtype.is_floating_point:
                    t.fill_(float("nan"))
                elif t.dtype != torch.bool:
                    t.fill_(ops_common.POISON_INT)
            return t
        return wrapper

    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))
    yield
