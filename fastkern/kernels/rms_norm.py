"""RMSNorm forward and backward over the last dim (formulas: fastkern/reference/rms_norm.py).

Both kernels work on tiles of BLOCK_M rows x BLOCK_N columns (the whole row): BLOCK_M is 1 for the
model's hidden size and larger for narrow rows (Qwen3's q_norm/k_norm over head_dim 128 at ~150K rows
per call), where one 128-element row per program leaves each program too little to do and the launch
is bound by scheduling programs, not by memory.

Forward: each row is read once, reduced to rstd = 1 / sqrt(mean(x^2) + eps) in
fp32, scaled and written; rstd (4 bytes per row) is stored for backward, which therefore needs only
the input x, not an fp32 copy of it (transformers' RMSNorm keeps x.float() for its backward: 2x the
input's bytes in bf16).

Backward, a contiguous range of rows per program, BLOCK_M rows at a time: dx of each row needs that row only,

    g = dy * w_eff,  dx = rstd * (g - xhat * mean(g * xhat)),  xhat = x * rstd,

while d(weight) = sum over rows of dy * xhat is a reduction across rows: each program accumulates its
rows in fp32 registers and writes one partial row; the launcher sums the partials (a [programs, N]
fp32 buffer, small next to x). Without a weight gradient (frozen norms under LoRA) that part is
compiled out and each program takes one tile.
"""

import triton
import triton.language as tl

from .bf16 import round_fp32_to_bf16_rtne, round_to


@triton.jit
def rms_norm_forward_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    n_rows, n_cols, x_row_stride, x_col_stride, y_row_stride, eps, weight_offset,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64_OFFSETS:
        pid = pid.to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :] * x_col_stride, mask=mask,
                other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # [BLOCK_M]
    xhat = x * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    if CAST_BEFORE_WEIGHT:
        y = round_to(xhat, y_ptr.dtype.element_ty, ROUND_BF16) * (w + weight_offset)
    else:
        y = xhat * (w + weight_offset)
    if ROUND_BF16:  # interpreter only (fastkern/kernels/bf16.py)
        y = round_fp32_to_bf16_rtne(y)
    tl.store(y_ptr + rows[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def rms_norm_backward_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    n_rows, n_cols, rows_per_program,
    dy_row_stride, dy_col_stride, x_row_stride, x_col_stride, dx_row_stride, weight_offset,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    HAS_WEIGHT_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64_OFFSETS:
        pid = pid.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w_eff = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :] + weight_offset
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < last
        mask = row_mask[:, None] & col_mask[None, :]
        # Masked lanes load 0 (x, dy and rstd), so they add nothing to dw.
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :] * x_col_stride, mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :] * dy_col_stride, mask=mask,
                     other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)[:, None]
        xhat = x * rstd
        g = dy * w_eff
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
        if ROUND_BF16:
            dx = round_fp32_to_bf16_rtne(dx)
        tl.store(dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_WEIGHT_GRAD:
            if CAST_BEFORE_WEIGHT:
                dw += tl.sum(dy * round_to(xhat, x_ptr.dtype.element_ty, ROUND_BF16), axis=0)
            else:
                dw += tl.sum(dy * xhat, axis=0)
    if HAS_WEIGHT_GRAD:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=col_mask)
