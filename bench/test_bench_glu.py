"""pytest-benchmark regression bench for SwiGLU/GeGLU (fwd+bwd).

GPU:  pytest bench/test_bench_glu.py --benchmark-json=glu.json
      python3 bench/compare.py bench/baselines/h100.json glu.json   # fails on a >10% median regression
CPU (CI): pytest bench/ --benchmark-disable   runs each case once at a tiny shape to catch rot.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from glu_impls import fwd_bwd, implementations, make_inputs  # noqa: E402

CUDA = torch.cuda.is_available()
SHAPES = [(16384, 14336), (4096, 11008)] if CUDA else [(3, 40)]
DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("impl", ["fastkern", "torch eager", "torch.compile", "liger"])
def test_glu_fwd_bwd(benchmark, impl, act, shape):
    impls = implementations(act, with_compile=CUDA)
    if impl not in impls:
        pytest.skip(f"{impl} not available here")
    fn = impls[impl]
    gate, up, dout = make_inputs(*shape, torch.bfloat16 if CUDA else torch.float32, DEVICE)

    def step():
        grads = fwd_bwd(fn, gate, up, dout)
        if CUDA:
            torch.cuda.synchronize()
        return grads

    step()  # compile / autotune outside the timing
    benchmark.extra_info.update(impl=impl, act=act, shape=list(shape), device=DEVICE)
    grads = benchmark.pedantic(step, rounds=30 if CUDA else 1, iterations=5 if CUDA else 1, warmup_rounds=2 if CUDA else 0)
    # Values are not checked here: fastkern and Liger write gradients into gate/up, so repeated rounds
    # drift to inf. Correctness is tests/ops/test_glu.py's and bench_glu.py's job (it checks first).
    assert [g.shape for g in grads] == [gate.shape, up.shape]
