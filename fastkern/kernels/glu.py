"""Gated linear unit activations: out = act(gate) * up, with act in {silu, gelu_tanh, gelu}.

Memory-bound elementwise kernels (0.375 FLOP/byte in bf16). Each program handles one row of a
[rows, cols] view and a BLOCK-wide slice of its columns; strides are explicit so transposed or
sliced inputs need no copy. When every operand is contiguous the launcher passes one flat row
(FLAT), which drops the per-row index math. Offsets are int32 unless the launcher says the largest offset of any
operand passes 2**31 - 1 (INT64_OFFSETS), which keeps the common case's address math cheap.

Backward recomputes act(gate) instead of saving it, and may write its two gradients into the
storage of gate and up (the launcher decides), so fwd+bwd needs no memory beyond the output.
"""

import triton
import triton.language as tl

from .bf16 import round_fp32_to_bf16_rtne

# Constants are written as literals inside the kernels: the compiler rejects plain-float globals,
# and the interpreter mishandles tl.constexpr globals on the left of an arithmetic operator.
#   k = sqrt(2/pi) = 0.7978845608028654, 2k = 1.5957691216057308, c = 0.044715 (tanh approximation of GELU)
#   1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327


@triton.jit
def _gelu_tanh_sigmoids(g):
    # gelu_tanh(g) = g/2 (1 + tanh(y)), y = k (g + c g^3). Since 1 + tanh(y) = 2 sigmoid(2y) exactly,
    # gelu_tanh(g) = g s with s = sigmoid(2y), and 1 - s = sigmoid(-2y). Both sigmoids come from one
    # p = exp(-|2y|) <= 1, which never overflows, and neither is a difference of nearly equal numbers:
    # the form 1 + tanh(y) cancels every digit where tanh(y) -> -1 (fp32 gave 0 for a true 1.8e-7).
    # Past |g| = 100 the sigmoids are exactly 0/1 in fp32; clamping keeps g**3 finite so 0 * finite
    # stays 0. NaN still propagates through the outer factor g.
    gc = tl.minimum(tl.maximum(g, -100.0), 100.0)
    y2 = 1.5957691216057308 * (gc + 0.044715 * gc * gc * gc)  # 2y, 2k = 2 sqrt(2/pi)
    p = tl.exp(-tl.abs(y2))
    inv = 1.0 / (1.0 + p)
    s = tl.where(y2 >= 0.0, inv, p * inv)
    one_minus_s = tl.where(y2 >= 0.0, p * inv, inv)
    return gc, s, one_minus_s


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACTIVATION == 1:
        gc, s, one_minus_s = _gelu_tanh_sigmoids(g)
        a = g * s
    else:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    return a


@triton.jit
def _activation_and_derivative(g, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        # silu(g) = g * s, s = sigmoid(g);  silu'(g) = s * (1 + g * (1 - s))
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACTIVATION == 1:
        # gelu(g) = g s, s = sigmoid(2y), y = k (g + c g^3)  (see _gelu_tanh_sigmoids)
        # gelu'(g) = s + g * 2 s (1 - s) * k (1 + 3 c g^2)
        gc, s, one_minus_s = _gelu_tanh_sigmoids(g)
        a = g * s
        # 0.134145 = 3c
        da = s + 2.0 * g * s * one_minus_s * 0.7978845608028654 * (1.0 + 0.134145 * gc * gc)
    else:
        # gelu(g) = g Phi(g);  gelu'(g) = Phi(g) + g phi(g)
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return a, da


@triton.jit
def _row_and_columns(BLOCK: tl.constexpr, INT64_OFFSETS: tl.constexpr, FLAT: tl.constexpr):
    """This program's row and BLOCK column indices.

    grid (rows, cdiv(n_cols, BLOCK)): rows on axis 0, whose limit is 2**31 - 1. FLAT: every operand
    is one contiguous row of n_cols elements and the grid is (cdiv(n_cols, BLOCK),). With int64
    offsets the block index is widened before it is scaled, so a flat row past 2**31 elements works.
    """
    if FLAT:
        col_block = tl.program_id(0)
        row = col_block * 0
    else:
        row = tl.program_id(0)
        col_block = tl.program_id(1)
    if INT64_OFFSETS:
        row = row.to(tl.int64)
        col_block = col_block.to(tl.int64)
    return row, col_block * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def glu_forward_kernel(
    gate_ptr, up_ptr, out_ptr,
    n_cols,
    gate_stride_row, gate_stride_col,
    up_stride_row, up_stride_col,
    out_stride_row, out_stride_col,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    FLAT: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    row, cols = _row_and_columns(BLOCK, INT64_OFFSETS, FLAT)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * gate_stride_row + cols * gate_stride_col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride_row + cols * up_stride_col, mask=mask, other=0.0).to(tl.float32)
    out = _activation(g, ACTIVATION) * u
    if ROUND_BF16:  # interpreter only (fastkern/kernels/bf16.py)
        out = round_fp32_to_bf16_rtne(out)
    tl.store(out_ptr + row * out_stride_row + cols * out_stride_col, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def glu_backward_kernel(
    grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr,
    n_cols,
    grad_out_stride_row, grad_out_stride_col,
    gate_stride_row, gate_stride_col,
    up_stride_row, up_stride_col,
    grad_gate_stride_row, grad_gate_stride_col,
    grad_up_stride_row, grad_up_stride_col,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    FLAT: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # grad_gate/grad_up may alias gate/up: every element is loaded before it is stored by the same
    # program, and programs own disjoint elements, so the in-place case is race free.
    row, cols = _row_and_columns(BLOCK, INT64_OFFSETS, FLAT)
    mask = cols < n_cols
    dout = tl.load(grad_out_ptr + row * grad_out_stride_row + cols * grad_out_stride_col, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + row * gate_stride_row + cols * gate_stride_col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride_row + cols * up_stride_col, mask=mask, other=0.0).to(tl.float32)
    a, da = _activation_and_derivative(g, ACTIVATION)
    grad_gate = dout * u * da
    grad_up = dout * a
    if ROUND_BF16:  # interpreter only (fastkern/kernels/bf16.py)
        grad_gate = round_fp32_to_bf16_rtne(grad_gate)
        grad_up = round_fp32_to_bf16_rtne(grad_up)
    tl.store(grad_gate_ptr + row * grad_gate_stride_row + cols * grad_gate_stride_col,
             grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_up_ptr + row * grad_up_stride_row + cols * grad_up_stride_col,
             grad_up.to(grad_up_ptr.dtype.element_ty), mask=mask)
