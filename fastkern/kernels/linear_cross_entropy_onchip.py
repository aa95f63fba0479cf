"""On-chip linear cross-entropy / log-probability kernels: logit tiles never leave the SM.

Both kernels compute logits tile by tile, x = H[rows] @ W[cols]^T (+ bias), with tl.dot over the
hidden dimension in fp32, and consume each [BLOCK_N, BLOCK_V] tile in registers.

* ``lce_onchip_fwd_kernel``: grid (row blocks, vocabulary splits). A program walks the vocabulary
  tiles of its split and keeps, per row, an online max m, sum_j exp(u_j - m), sum_j exp(u_j - m) u_j
  (entropy), sum_j u_j (label smoothing), the target's u, and the max over columns before the target
  (TRL's is_top1), with u = transform(x) (logit scale, softcap, 1/temperature). It writes these six
  partials per (split, row); the launcher combines the splits (a few [splits, N] torch ops).
* ``lce_onchip_bwd_kernel``: one program per (row block, vocabulary tile). It recomputes the tile,
  forms d(objective)/dx = (A p - B [j = t] - C + E p (S - u)) du/dx on chip (p = exp(u - lse), the
  same per-row coefficients as the chunked row kernel), rounds it to the input dtype for the tensor
  cores, and adds D @ W[cols] into dH[rows] and D^T @ H[rows] into dW[cols] one hidden chunk at a
  time, with fp32 atomics into fp32 accumulators (the launcher bounds their size and casts them).

Padded vocabulary lanes are masked to -inf *after* the softcap (tanh(0) = 0 would give them mass).
Row and column indices are int64 before they multiply a stride (N*H and V*H can pass 2**31); the
cost is one multiply per tile, outside the hidden loop.
"""

import triton
import triton.language as tl

from .bf16 import round_fp32_to_bf16_rtne
from .linear_cross_entropy import _transform


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # UPCAST (interpreter only): its tl.dot multiplies bf16 operands as raw bits; bf16/fp16 products
    # are exact in fp32, so multiplying upcast operands in fp32 gives what the GPU's MMA gives.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hk, stride_wv, stride_wk,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # x[BLOCK_N, BLOCK_V] = H[rows, :] @ W[cols, :]^T, fp32 accumulation over the hidden dim.
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk
    b_ptrs = w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k in range(0, H, BLOCK_K):
        k_ok = (k + ks) < H
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(a, tl.trans(b), acc, UPCAST, DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_hk
        b_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def lce_onchip_fwd_kernel(
    h_ptr, w_ptr, bias_ptr, targets_ptr, part_ptr,
    N, V, H, n_splits,
    stride_hn, stride_hk, stride_wv, stride_wk,
    logit_scale, softcap, u_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_TOP1: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # h: [N, H], w: [V, H] (any strides), bias: [V], targets: [N] int64 (-1 = none).
    # part: [6, n_splits, N] fp32 = (max, sum exp(u - max), sum exp(u - max) u, sum u, target u,
    # max over columns before the target); a split without tiles writes the empty-set values.
    # Program id 0 (row blocks) varies fastest: the programs running together share a split and walk
    # the same W tiles in step, so each W tile comes from HBM about once per wave (L2 serves the rest).
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    logit_scale = tl.cast(logit_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    u_scale = tl.cast(u_scale, tl.float32)

    n_tiles = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(n_tiles, n_splits)
    t_start = split * per_split
    t_end = tl.minimum(t_start + per_split, n_tiles)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_uc = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(u - shift) (u - shift), centred at shift
    prev_shift = tl.zeros((BLOCK_N,), tl.float32)
    sum_u = tl.zeros((BLOCK_N,), tl.float32)
    target_u = tl.zeros((BLOCK_N,), tl.float32)
    max_before = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for t in range(t_start, t_end):
        cols = t * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)  # t * BLOCK_V < V < 2**31
        col_ok = cols < V
        x = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hk, stride_wv, stride_wk,
                        UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        if HAS_BIAS:
            x += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        u, _ = _transform(x, logit_scale, softcap, u_scale, HAS_SOFTCAP)
        # Mask after the transform: a padded lane is -inf whatever the softcap maps 0 to.
        u_masked = tl.where(col_ok[None, :], u, float("-inf"))
        m_new = tl.maximum(m, tl.max(u_masked, axis=1))
        # All -inf so far (a masked vocabulary, a -inf bias): shift by 0, since exp(-inf - (-inf)) is NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - shift)
        e = tl.exp(u_masked - shift[:, None])
        if HAS_ENTROPY:
            # Re-centred from prev_shift to shift (as in the chunked row kernel); p log p -> 0 as p -> 0:
            # a -inf logit adds nothing (not 0 * -inf = NaN).
            sum_exp_uc = (sum_exp_uc + (prev_shift - shift) * sum_exp) * rescale + tl.sum(
                e * tl.where(e > 0.0, u - shift[:, None], 0.0), axis=1)
            prev_shift = shift
        sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
        sum_u += tl.sum(tl.where(col_ok[None, :], u, 0.0), axis=1)
        target_u += tl.sum(tl.where(cols[None, :] == target[:, None], u, 0.0), axis=1)
        if HAS_TOP1:
            before = tl.where(cols[None, :] < target[:, None], u_masked, float("-inf"))
            max_before = tl.maximum(max_before, tl.max(before, axis=1))
        m = m_new

    stride_q = n_splits * N  # 6 * splits * N stays far below 2**31
    out = part_ptr + rows + split * N
    tl.store(out, m, mask=row_ok)
    tl.store(out + stride_q, sum_exp, mask=row_ok)
    tl.store(out + 2 * stride_q, sum_exp_uc, mask=row_ok)
    tl.store(out + 3 * stride_q, sum_u, mask=row_ok)
    tl.store(out + 4 * stride_q, target_u, mask=row_ok)
    tl.store(out + 5 * stride_q, max_before, mask=row_ok)


@triton.jit
def lce_onchip_bwd_kernel(
    h_ptr, w_ptr, bias_ptr, targets_ptr, lse_ptr, sum_plogp_ptr,
    coef_a_ptr, coef_b_ptr, coef_c_ptr, coef_e_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, V, H, r0, r1, v0, v1, dh_row0, dw_row0,
    stride_hn, stride_hk, stride_wv, stride_wk,
    logit_scale, softcap, u_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    NEED_GH: tl.constexpr, NEED_GW: tl.constexpr, NEED_GB: tl.constexpr,
    ROUND_BF16: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # Rows [r0, r1) x vocabulary [v0, v1) of the problem. Per-row vectors (lse, sum_plogp, coefficients):
    # [N] fp32. Accumulators, all fp32 and contiguous: dh [*, H] holding row r at (r - dh_row0),
    # dw [*, H] holding vocabulary row j at (j - dw_row0), db [V].
    # Grouped order: GROUP_N row blocks share a group, the vocabulary tile varies slowest inside it,
    # so a wave of programs reads a few H blocks and each W tile ~GROUP_N times from L2, once from HBM.
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(r1 - r0, BLOCK_N)
    v_blocks = tl.cdiv(v1 - v0, BLOCK_V)
    in_group = GROUP_N * v_blocks
    group = pid // in_group
    first_n = group * GROUP_N
    group_size = tl.minimum(n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % in_group) % group_size
    pid_v = (pid % in_group) // group_size

    rows = r0 + pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v0 + pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < r1
    col_ok = cols < v1
    logit_scale = tl.cast(logit_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    u_scale = tl.cast(u_scale, tl.float32)

    x = _logit_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_hn, stride_hk, stride_wv, stride_wk,
                    UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    u, dudx = _transform(x, logit_scale, softcap, u_scale, HAS_SOFTCAP)
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(coef_a_ptr + rows, mask=row_ok, other=0.0)
    b = tl.load(coef_b_ptr + rows, mask=row_ok, other=0.0)
    c = tl.load(coef_c_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(u - lse[:, None])
    # d objective / du_j = A p_j - B [j = t] - C (+ E p_j (S - u_j)); the launcher chose A, B, C, E.
    du = a[:, None] * p - tl.where(cols[None, :] == target[:, None], b[:, None], 0.0) - c[:, None]
    if HAS_ENTROPY:
        e = tl.load(coef_e_ptr + rows, mask=row_ok, other=0.0)
        s = tl.load(sum_plogp_ptr + rows, mask=row_ok, other=0.0)
        # S - u_j = sum_k p_k log p_k - log p_j (no cancellation); p = 0 (a -inf logit) contributes 0.
        du += e[:, None] * p * (s[:, None] - tl.where(p > 0.0, u - lse[:, None], 0.0))
    d = tl.where(row_ok[:, None] & col_ok[None, :], du * dudx, 0.0)

    if NEED_GB:
        tl.atomic_add(db_ptr + cols, tl.sum(d, axis=0), mask=col_ok, sem="relaxed")
    # The products run on the tensor cores in the input dtype: D is rounded once, as the chunked
    # path rounds its dlogits buffer. The interpreter truncates fp32 -> bf16, so it rounds by hand.
    if ROUND_BF16:
        d_op = round_fp32_to_bf16_rtne(d)
    else:
        d_op = d.to(h_ptr.dtype.element_ty)
    d_op_t = tl.trans(d_op)

    hs = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        h_ok = (h0 + hs) < H
        if NEED_GH:
            w_c = tl.load(w_ptr + cols[:, None] * stride_wv + (h0 + hs)[None, :] * stride_wk,
                          mask=col_ok[:, None] & h_ok[None, :], other=0.0)  # [BLOCK_V, BLOCK_H]
            gh = _mma(d_op, w_c, tl.zeros((BLOCK_N, BLOCK_H), tl.float32), UPCAST, DOT_PRECISION)
            tl.atomic_add(dh_ptr + (rows - dh_row0)[:, None] * H + (h0 + hs)[None, :], gh,
                          mask=row_ok[:, None] & h_ok[None, :], sem="relaxed")
        if NEED_GW:
            h_c = tl.load(h_ptr + rows[:, None] * stride_hn + (h0 + hs)[None, :] * stride_hk,
                          mask=row_ok[:, None] & h_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_H]
            gw = _mma(d_op_t, h_c, tl.zeros((BLOCK_V, BLOCK_H), tl.float32), UPCAST, DOT_PRECISION)
            tl.atomic_add(dw_ptr + (cols - dw_row0)[:, None] * H + (h0 + hs)[None, :], gw,
                          mask=col_ok[:, None] & h_ok[None, :], sem="relaxed")
