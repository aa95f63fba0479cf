"""Offsets past 2**31 elements: each kernel path that lacked a test beyond int32 reach gets one here.

Already covered in the op's own test file: swiglu's flat (contiguous) path, rms_norm with a frozen
weight, rope, the linear cross-entropy row kernel. Here: the NF4 dequantize kernel (a weight past 2**31
elements, its int64 variant also forced on CPU), nf4_matmul (x, out and W each past int32 reach),
the GLU row-layout path (gate and up as strided halves of one fused projection, as the mlp patch
gives them for Phi-3 and GLM), rms_norm backward with a trainable weight, and the tiled MLP over a
Llama-3.1-8B MLP whose untiled [T, 14336] activations would pass 2**31 elements.

GPU cases allocate 4-20 GB each and check head and tail rows (where int32 offsets would wrap)
against a float64 computation on those rows only.
"""

import gc
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastkern
from fastkern import runtime
from fastkern.ops._common import needs_int64
from fastkern.ops.tiled_mlp import tiled_mlp
from tests.oracle import assert_close

BIG = 2**31 + 2**20  # elements: past int32 reach by a margin larger than any tile's masked lanes


def _edges(rows: int, n: int = 64):
    return (slice(0, n), slice(rows - n, rows))


def test_nf4_dequantize_int64_variant_is_bit_exact(monkeypatch):
    """The INT64_OFFSETS variant of the dequantize kernel (taken past 2**31 elements) on a small weight."""
    nf4_ops = importlib.import_module("fastkern.ops.nf4")
    for double_quant in (True, False):
        packed, state = fastkern.ops.nf4_quantize(torch.randn(48, 320), double_quant=double_quant)
        want = fastkern.ops.nf4_dequantize(packed, state, dtype=torch.bfloat16)
        monkeypatch.setattr(nf4_ops, "INT32_MAX", 100)
        got = fastkern.ops.nf4_dequantize(packed, state, dtype=torch.bfloat16)
        monkeypatch.undo()
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [True, False])
def test_gpu_nf4_dequantize_past_2_31(double_quant):
    cols = 4096
    rows = BIG // cols
    w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    packed, state = fastkern.ops.nf4_quantize(w, double_quant=double_quant)
    del w
    got = fastkern.ops.nf4_dequantize(packed, state, dtype=torch.bfloat16)
    assert got.numel() > 2**31
    with runtime.force_reference():
        want = fastkern.ops.nf4_dequantize(packed, state, dtype=torch.bfloat16)
    for sl in _edges(rows):
        assert torch.equal(got[sl].view(torch.int16), want[sl].view(torch.int16)), sl


@pytest.mark.gpu
def test_gpu_nf4_matmul_x_out_and_weight_past_2_31():
    from fastkern.experimental.nf4_matmul import nf4_matmul

    k = 4096
    # x [M, K] past 2**31 elements (W small); then W^T product whose output passes it.
    packed, state = fastkern.ops.nf4_quantize(torch.randn(128, k, device="cuda"))
    w = fastkern.ops.nf4_dequantize(packed, state, dtype=torch.bfloat16).double()
    rows = BIG // k
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    assert needs_int64(x)
    out = nf4_matmul(x, packed, state)
    for sl in _edges(rows):
        ref = x[sl].double() @ w.T
        assert_close(out[sl], ref, torch.bfloat16, (x[sl] @ w.T.bfloat16()), f"x past 2**31, rows {sl}")
    del x, out
    g = torch.randn(rows, 128, device="cuda", dtype=torch.bfloat16)
    dx = nf4_matmul(g, packed, state, transpose=True)  # [rows, K]: the output passes 2**31
    assert dx.numel() > 2**31
    for sl in _edges(rows):
        assert_close(dx[sl], g[sl].double() @ w, torch.bfloat16, g[sl] @ w.bfloat16(), f"out past 2**31, rows {sl}")
    del g, dx
    # W itself past 2**31 elements: flat indices into the packed bytes need int64
    big_w = torch.randn(BIG // k, k, device="cuda", dtype=torch.bfloat16)
    packed, state = fastkern.ops.nf4_quantize(big_w, double_quant=True)
    del big_w
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    out = nf4_matmul(x, packed, state)
    n = out.shape[1]
    with runtime.force_reference():
        w_rows = torch.cat([fastkern.ops.nf4_dequantize(packed, state, dtype=torch.bfloat16)[sl] for sl in _edges(n)])
    ref = x.double() @ w_rows.double().T
    got = torch.cat([out[:, sl] for sl in _edges(n)], dim=1)
    assert_close(got, ref, torch.bfloat16, x @ w_rows.T, "W past 2**31")


@pytest.mark.gpu
def test_gpu_glu_strided_halves_past_2_31():
    """gate and up as the two halves of a fused [T, 2I] projection: the row-layout (non-flat) launch,
    whose row stride is 2I, past int32 reach."""
    cols = 8192
    rows = BIG // (2 * cols) + 64
    gate_up = torch.randn(rows, 2 * cols, device="cuda", dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous() and needs_int64(gate)
    out = fastkern.ops.swiglu(gate, up)
    for sl in _edges(rows):
        ref = F.silu(gate[sl].double()) * up[sl].double()
        assert_close(out[sl], ref, torch.bfloat16, F.silu(gate[sl]) * up[sl], f"rows {sl}")
    dout = torch.randn_like(out)
    del out
    from fastkern.ops.glu import glu_backward_op

    dg, du = glu_backward_op(dout, gate, up, "silu")
    for sl in _edges(rows):
        g64, u64 = gate[sl].double().requires_grad_(), up[sl].double().requires_grad_()
        (F.silu(g64) * u64).backward(dout[sl].double())
        gt, ut = gate[sl].clone().requires_grad_(), up[sl].clone().requires_grad_()
        (F.silu(gt) * ut).backward(dout[sl])
        assert_close(dg[sl], g64.grad, torch.bfloat16, gt.grad, f"grad_gate rows {sl}")
        assert_close(du[sl], u64.grad, torch.bfloat16, ut.grad, f"grad_up rows {sl}")


@pytest.mark.gpu
def test_gpu_rms_norm_weight_grad_past_2_31():
    """rms_norm backward with a trainable weight (per-program partial sums) past 2**31 elements."""
    hidden = 4096
    rows = BIG // hidden
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    dy = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    fastkern.ops.rms_norm(x, w, 1e-6).backward(dy)
    for sl in _edges(rows):
        x64 = x.detach()[sl].double().requires_grad_()
        y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w.detach().double()
        y64.backward(dy[sl].double())
        xt = x.detach()[sl].clone().requires_grad_()
        yt = (xt.float() * torch.rsqrt(xt.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(xt.dtype) * w.detach()
        yt.backward(dy[sl])
        assert_close(x.grad[sl], x64.grad, torch.bfloat16, xt.grad, f"grad_x rows {sl}")
    # the weight gradient sums over every row: compare with float64 over all rows, chunked to bound memory
    dw = torch.zeros(hidden, dtype=torch.float64, device="cuda")
    for s in range(0, rows, 65536):
        xs = x.detach()[s:s + 65536].double()
        dw += (dy[s:s + 65536].double() * xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-6)).sum(0)
    assert_close(w.grad, dw, torch.bfloat16, None, "grad_weight")


@pytest.mark.gpu
def test_gpu_tiled_mlp_llama8b_past_2_31():
    """The Llama-3.1-8B MLP (H 4096, I 14336, fused swiglu) at 160K tokens: untiled, each [T, I] tensor
    has 2.35e9 elements; tiled, no tensor does. Same rows and weight gradients as the untiled run."""

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = torch.nn.Linear(4096, 14336, bias=False)
            self.up_proj = torch.nn.Linear(4096, 14336, bias=False)
            self.down_proj = torch.nn.Linear(14336, 4096, bias=False)

        def forward(self, x):
            h = fastkern.ops.swiglu(self.gate_proj(x), self.up_proj(x), overwrite_inputs_in_backward=True)
            return self.down_proj(h)

    torch.manual_seed(0)
    mlp = MLP().cuda().bfloat16()
    t = 163840
    assert t * 14336 > 2**31
    x = torch.randn(1, t, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, t, 4096, device="cuda", dtype=torch.bfloat16)
    # Peaks above what is already allocated: memory an earlier test left alive (a failed test's
    # traceback keeps its tensors) must not count against the tiled run.
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = tiled_mlp(mlp, x, intermediate=14336)
    y.backward(g)
    tiled_peak = torch.cuda.max_memory_allocated() - base
    got = (y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in mlp.named_parameters()})
    del y
    x.grad = None
    mlp.zero_grad(set_to_none=True)
    gc.collect()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = mlp(x)
    y.backward(g)
    untiled_peak = torch.cuda.max_memory_allocated() - base
    # untiled holds gate, up and the GLU output ([T, I], 4.7 GB each) from forward to backward
    assert untiled_peak - tiled_peak > 3 * t * 14336 * 2 * 0.9, (tiled_peak, untiled_peak)
    # Per row the math is the same; GEMMs of other M may round differently (bf16: ~4e-3 per element).
    for sl in _edges(t):
        assert _rel(got[0][0, sl], y.detach()[0, sl]) < 1e-2, sl
        assert _rel(got[1][0, sl], x.grad[0, sl]) < 1e-2, sl
    for n, p in mlp.named_parameters():
        assert _rel(got[2][n], p.grad) < 1e-2, n


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
