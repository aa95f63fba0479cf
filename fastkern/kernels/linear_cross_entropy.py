"""Row kernel of the chunked linear cross-entropy / log-probability ops.

The launcher (fastkern/ops/linear_cross_entropy.py) computes a chunk of raw logits
x = hidden_chunk @ weight.T (+ bias) with cuBLAS into a [rows, V] buffer. One program of this kernel
owns one row of that buffer and makes up to two passes over it:

* stats pass: u = transform(x) (logit scale, optional softcap, 1/temperature), then online
  max / sum(exp) / sum(exp * (u - max)) in fp32, the target's u and sum(u) (label smoothing). The
  entropy statistic is sum_j p_j log p_j = sum_j p_j (u_j - max) / ... - log sum(exp) (= -entropy): a
  sum of two non-positive terms. The uncentred lse - sum_j p_j u_j cancels catastrophically on a
  confident row (entropy 0.09 beside u ~ 5 lost ~6 bits in fp32). Padded lanes
  of the last block are set to -inf *after* the softcap, so tanh never gives them probability mass.
  Optionally (HAS_TOP1) the row max and the max over columns before the target (TRL's is_top1).
* gradient pass: overwrites the row in place with d(objective)/dx, where per row
      d/du_j = A p_j - B [j == t] - C + E p_j (S - u_j),   p = softmax(u), S = sum_j p_j u_j,
  computed as S - u_j = sum_k p_k log p_k - log p_j (both centred at lse, no cancellation)
  (A, B, C, E are per-row coefficients the launcher chose: cross-entropy with label smoothing,
  log-probability, entropy) times du/dx = scale / T * (1 - tanh^2) (the softcap derivative).

Every element of the row is loaded before it is overwritten by the same program, so the in-place
update is race free. Row offsets are int64 (a chunk can pass 2**31 elements); column offsets are
int32 since V < 2**31.
"""

import triton
import triton.language as tl

from .bf16 import round_fp32_to_bf16_rtne


@triton.jit
def _transform(x, logit_scale, softcap, u_scale, HAS_SOFTCAP: tl.constexpr):
    # Returns (u, du/dx). tanh(y) = 1 - 2 / (exp(2y) + 1) saturates to +-1 without inf / inf.
    y = x * logit_scale
    if HAS_SOFTCAP:
        t = 1.0 - 2.0 / (tl.exp(2.0 * y / softcap) + 1.0)
        u = softcap * t * u_scale
        dudx = logit_scale * u_scale * (1.0 - t * t)
    else:
        u = y * u_scale
        dudx = tl.zeros_like(x) + logit_scale * u_scale
    return u, dudx


@triton.jit
def lce_rows_kernel(
    x_ptr, x_stride_row,
    targets_ptr,
    lse_ptr, target_u_ptr, sum_u_ptr, sum_plogp_ptr, max_u_ptr, max_before_target_ptr,
    coef_a_ptr, coef_b_ptr, coef_c_ptr, coef_e_ptr,
    n_cols,
    logit_scale, softcap, u_scale,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_STATS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_TOP1: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # x: [rows, n_cols] (any float dtype, column stride 1); per-row vectors: [rows] fp32.
    # targets: [rows] int64, -1 for rows without a target (ignored labels).
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride_row
    target = tl.load(targets_ptr + row).to(tl.int32)
    logit_scale = tl.cast(logit_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    u_scale = tl.cast(u_scale, tl.float32)
    cols0 = tl.arange(0, BLOCK)

    if COMPUTE_STATS:
        m = tl.full((), float("-inf"), tl.float32)
        sum_exp = tl.zeros((), tl.float32)
        sum_exp_uc = tl.zeros((), tl.float32)  # sum exp(u - shift) (u - shift), centred at shift
        prev_shift = tl.zeros((), tl.float32)
        sum_u = tl.zeros((), tl.float32)
        target_u = tl.zeros((), tl.float32)
        max_before_target = tl.full((), float("-inf"), tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            u, _ = _transform(x, logit_scale, softcap, u_scale, HAS_SOFTCAP)
            u_valid = tl.where(mask, u, 0.0)
            u_masked = tl.where(mask, u, float("-inf"))
            m_new = tl.maximum(m, tl.max(u_masked, axis=0))
            # While every logit so far is -inf (a masked vocabulary: a -inf bias) the shift is 0, not
            # -inf: exp(-inf - (-inf)) would be NaN where log_softmax gives -inf for those columns.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            rescale = tl.exp(m - shift)
            e = tl.exp(u_masked - shift)
            if HAS_ENTROPY:
                # Moving the centre from prev_shift to shift: sum e'(u - shift) = rescale * (sum e (u -
                # prev_shift) + (prev_shift - shift) sum e). p log p -> 0 as p -> 0: a -inf logit adds
                # nothing (e * u would be 0 * -inf = NaN).
                sum_exp_uc = (sum_exp_uc + (prev_shift - shift) * sum_exp) * rescale + tl.sum(
                    tl.where(e > 0.0, e * (u_valid - shift), 0.0), axis=0)
                prev_shift = shift
            sum_exp = sum_exp * rescale + tl.sum(e, axis=0)
            sum_u += tl.sum(u_valid, axis=0)
            target_u += tl.sum(tl.where(cols == target, u_valid, 0.0), axis=0)
            if HAS_TOP1:
                # is the target the first argmax: u_t >= max and u_t > max over earlier columns
                max_before_target = tl.maximum(
                    max_before_target, tl.max(tl.where(cols < target, u_masked, float("-inf")), axis=0))
            m = m_new
        lse = m + tl.log(sum_exp)
        sum_plogp = sum_exp_uc / sum_exp - tl.log(sum_exp)
        tl.store(lse_ptr + row, lse)
        tl.store(target_u_ptr + row, target_u)
        tl.store(sum_u_ptr + row, sum_u)
        if HAS_ENTROPY:
            tl.store(sum_plogp_ptr + row, sum_plogp)
        if HAS_TOP1:
            tl.store(max_u_ptr + row, m)
            tl.store(max_before_target_ptr + row, max_before_target)
    else:
        lse = tl.load(lse_ptr + row)
        if HAS_ENTROPY:
            sum_plogp = tl.load(sum_plogp_ptr + row)

    if WRITE_GRAD:
        a = tl.load(coef_a_ptr + row)
        b = tl.load(coef_b_ptr + row)
        c = tl.load(coef_c_ptr + row)
        if HAS_ENTROPY:
            ent = tl.load(coef_e_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            u, dudx = _transform(x, logit_scale, softcap, u_scale, HAS_SOFTCAP)
            p = tl.exp(u - lse)
            du = a * p - tl.where(cols == target, b, 0.0) - c
            if HAS_ENTROPY:
                # Same limit as in the stats pass: p = 0 (a -inf logit) contributes 0, not 0 * inf.
                du += tl.where(p > 0.0, ent * p * (sum_plogp - (u - lse)), 0.0)
            dx = du * dudx
            if ROUND_BF16:
                dx = round_fp32_to_bf16_rtne(dx)
            tl.store(x_row + cols, dx.to(x_ptr.dtype.element_ty), mask=mask)
