"""Test setup: Triton interpreter on CPU-only machines, Hypothesis profiles, poisoned allocations.

Every kernel test in CI runs the real Triton kernel through Triton's interpreter. The variable must
be set before triton is imported, which is why it is set here, before fastkern is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

from fastkern.demo_common import quiet_bitsandbytes_cpu_notice  # noqa: E402

# bitsandbytes logs, at import on every CPU run, that its optional hub CPU kernel did not load; it then
# runs its built-in CPU code, which is what the tests exercise anyway. Only that one message is dropped.
quiet_bitsandbytes_cpu_notice()

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# ci: bounded so the whole CPU suite stays well under 20 minutes on 2 cores (interpreter is slow), and
# derandomized so a run is reproducible: the same commit passes or fails the same way everywhere.
# dev (pytest --hypothesis-profile dev) draws fresh examples each run and is how new failures are hunted.
settings.register_profile("ci", max_examples=12, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=40, derandomize=False, **_COMMON)
# gpu: real sizes take seconds per example; 20 keeps the whole GPU suite within a few minutes.
settings.register_profile("gpu", max_examples=20, derandomize=False, **_COMMON)
settings.load_profile("ci")


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
    """Fill every new torch.empty* allocation with NaN (floats) or a sentinel (ints), so an output
    element a kernel forgets to write fails the comparison instead of passing by luck."""
    def poisoned(fn):
        def wrapper(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.numel():
                if t.dtype.is_floating_point:
                    t.fill_(float("nan"))
                elif t.dtype != torch.bool:
                    t.fill_(-7)
            return t
        return wrapper

    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))
    yield
