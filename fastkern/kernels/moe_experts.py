"""Grouped GEMMs for the routed experts of an MoE layer (gated experts, stacked 3-D weights).

Notation: N tokens, top-k K, S = N * K (token, expert) pairs, pair s = t * K + k; E experts with
gate_up [E, 2I, H] and down [E, H, I], each read through strides (a transposed [E, H, 2I] weight is
the same matrix with other strides). The gate and up rows of gate_up are either concatenated (gate
rows 0..I-1, up rows I..2I-1) or interleaved (gate row 2j, up row 2j + 1): the launcher passes the
gate's row step (1 or 2 rows) and the offset of the up row (I rows or 1), so one kernel reads both.
The stored gate|up per pair ([S, 2I], and its gradient) keeps the weights' own column order, so the
backward GEMMs against gate_up need no reordering. Optional biases: gate_up_bias [E, 2I] (same column
order) and down_bias [E, H].

Activation (constexpr CLAMPED):
  silu:            h = silu(gate) * up
  clamped SwiGLU:  g = min(gate, limit), u = clamp(up, -limit, limit), h = g * sigmoid(alpha g) * (u + 1)
                   (gpt-oss: alpha 1.702, limit 7); the clamps pass no gradient where they bind.

The launcher (fastkern/ops/moe_experts.py) sorts the pairs by expert and lays them out in
``pair_ids``, each expert's run padded to a multiple of BLOCK_M with -1, so that every BLOCK_M block
of pair_ids belongs to one expert (``block_expert``; -1 for the unused blocks at the end: the grid is
sized by the upper bound cdiv(S, BLOCK_M) + E, so building it needs no device-to-host sync). One
launch then covers every expert: a program reads its block's expert id and pair ids, gathers its
rows, and multiplies by that expert's weight matrix.

Intermediates are stored by pair index s (not in sorted order), so the un-permute is a plain
strided sum over k. Every row and expert offset is formed in int64: S * 2I and E * 2I * H pass
2**31 at real sizes (Mixtral: 8 * 28672 * 4096 = 0.94e9 elements per weight, 16K pairs * 28672).

Forward:   moe_gate_up_kernel   x[t] @ gate_up[e].T (+ bias) -> gate, up (stored) and h = act(gate, up)
           grouped_rows_kernel  (h[s] @ down[e].T (+ bias)) * w[s] -> y[s]
           moe_combine_kernel   out[t] = sum_k y[t K + k]
Backward:  moe_down_backward_kernel  g = dout[t] @ down[e]; dw[s] = <h[s], g> (+ <bias, dout[t]>);
                                     d(gate, up) from w[s] g through the activation
           grouped_rows_kernel       d(gate_up)[s] @ gate_up[e] -> dx[s]; moe_combine_kernel sums over k
           expert_weight_grad_kernel per expert, sum over its pairs of outer products (d down, d gate_up),
                                     and of the rows of L (the bias gradients)
"""

import triton
import triton.language as tl

from .bf16 import round_fp32_to_bf16_rtne


@triton.jit
def _to_dtype_fp32(v, dtype, ROUND_BF16: tl.constexpr):
    # v rounded to the storage dtype and back to fp32: what a later kernel reading the stored value sees.
    if ROUND_BF16:
        v = round_fp32_to_bf16_rtne(v)
    return v.to(dtype).to(tl.float32)


@triton.jit
def _store_rounded(ptr, v, mask, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        v = round_fp32_to_bf16_rtne(v)
    tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mma(a, b, acc, ROUND_BF16: tl.constexpr):
    # "ieee": fp32 operands multiply in full fp32 (the default would be tf32 on the GPU, 10 mantissa bits);
    # bf16/fp16 operands are unaffected. The interpreter's dot mishandles bf16 operands: there (ROUND_BF16)
    # they go in as fp32, exact for bf16 values, so the products and the fp32 sum are the GPU's.
    if ROUND_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _glu(gate, up, alpha, limit, CLAMPED: tl.constexpr):
    # h from fp32 gate and up. The clamps are written with where so that NaN passes through, as torch.clamp's.
    if CLAMPED:
        g = tl.where(gate > limit, limit, gate)
        u = tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))
        h = g / (1.0 + tl.exp(-alpha * g)) * (u + 1.0)
    else:
        h = gate / (1.0 + tl.exp(-gate)) * up
    return h


@triton.jit
def _glu_backward(gate, up, dh, alpha, limit, CLAMPED: tl.constexpr):
    # (h, d gate, d up) from fp32 gate, up and d h. A clamp that binds passes no gradient (torch.clamp:
    # gradient where lo <= x <= hi).
    if CLAMPED:
        g = tl.where(gate > limit, limit, gate)
        u = tl.where(up > limit, limit, tl.where(up < -limit, -limit, up))
        sig = 1.0 / (1.0 + tl.exp(-alpha * g))
        glu = g * sig
        h = glu * (u + 1.0)
        dgate = tl.where(gate <= limit, dh * (u + 1.0) * (sig * (1.0 + alpha * g * (1.0 - sig))), 0.0)
        dup = tl.where((up >= -limit) & (up <= limit), dh * glu, 0.0)
    else:
        sig = 1.0 / (1.0 + tl.exp(-gate))
        act = gate * sig
        h = act * up
        dgate = dh * up * (sig * (1.0 + gate * (1.0 - sig)))
        dup = dh * act
    return h, dgate, dup


@triton.jit
def moe_gate_up_kernel(
    x_ptr, w_ptr, b_ptr, pair_ptr, block_expert_ptr, gu_ptr, h_ptr,
    I, H, TOP_K, W_UP, B_UP, GU_STEP, GU_UP, alpha, limit,
    stride_xn, stride_xh, stride_we, stride_wg, stride_wh, stride_be, stride_bg, stride_gu, stride_h,
    HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # One program: BLOCK_M pairs of one expert x BLOCK_N columns j of the gate AND the same columns of up,
    # so the activation epilogue has both operands in registers. Gate column j is weight row j * stride_wg
    # (stride_wg = the row stride, or twice it when interleaved), up is W_UP further (I rows, or 1); in gu
    # they are columns j * GU_STEP and j * GU_STEP + GU_UP, in the bias j * stride_bg and + B_UP. gate and
    # up (bias included) are stored for backward; h is computed from their stored (rounded) values, the
    # same numbers backward recomputes it from.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        s = tl.load(pair_ptr + rows).to(tl.int64)
        valid = s >= 0
        tok = tl.where(valid, s // TOP_K, 0)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < I
        x_rows = x_ptr + tok[:, None] * stride_xn
        w_gate = w_ptr + e * stride_we + cols.to(tl.int64)[None, :] * stride_wg
        w_up = w_gate + W_UP  # formed on the host, int64 where it must be
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask_k = kk < H
            a = tl.load(x_rows + kk[None, :] * stride_xh, mask=valid[:, None] & mask_k[None, :], other=0.0)
            b_mask = mask_k[:, None] & mask_n[None, :]
            bg = tl.load(w_gate + kk[:, None] * stride_wh, mask=b_mask, other=0.0)
            bu = tl.load(w_up + kk[:, None] * stride_wh, mask=b_mask, other=0.0)
            acc_g = _mma(a, bg, acc_g, ROUND_BF16)
            acc_u = _mma(a, bu, acc_u, ROUND_BF16)
        if HAS_BIAS:
            b_gate = b_ptr + e * stride_be + cols * stride_bg
            acc_g += tl.load(b_gate, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b_gate + B_UP, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_mask = valid[:, None] & mask_n[None, :]
        gu_rows = gu_ptr + s[:, None] * stride_gu + (cols * GU_STEP)[None, :]
        _store_rounded(gu_rows, acc_g, out_mask, ROUND_BF16)
        _store_rounded(gu_rows + GU_UP, acc_u, out_mask, ROUND_BF16)
        gate = _to_dtype_fp32(acc_g, gu_ptr.dtype.element_ty, ROUND_BF16)
        up = _to_dtype_fp32(acc_u, gu_ptr.dtype.element_ty, ROUND_BF16)
        h = _glu(gate, up, alpha, limit, CLAMPED)
        _store_rounded(h_ptr + s[:, None] * stride_h + cols[None, :], h, out_mask, ROUND_BF16)


@triton.jit
def grouped_rows_kernel(
    a_ptr, w_ptr, b_ptr, pair_ptr, block_expert_ptr, scale_ptr, out_ptr,
    N_OUT, K_IN,
    stride_a, stride_we, stride_wk, stride_wn, stride_be, stride_bn, stride_out,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # out[s, n] = scale[s] * (sum_k a[s, k] * W[e, k, n] + bias[e, n]) for the pairs s of one expert's
    # block, with W read through strides: down[e].T in forward (k along I, n along H), gate_up[e] for dx in
    # backward (no bias, no scale there).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        s = tl.load(pair_ptr + rows).to(tl.int64)
        valid = s >= 0
        s_safe = tl.where(valid, s, 0)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < N_OUT
        a_rows = a_ptr + s_safe[:, None] * stride_a
        w_cols = w_ptr + e * stride_we + cols.to(tl.int64)[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_IN, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask_k = kk < K_IN
            a = tl.load(a_rows + kk[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_cols + kk.to(tl.int64)[:, None] * stride_wk, mask=mask_k[:, None] & mask_n[None, :],
                        other=0.0)
            acc = _mma(a.to(b.dtype), b, acc, ROUND_BF16)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * stride_be + cols * stride_bn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + s_safe, mask=valid, other=0.0).to(tl.float32)[:, None]
        _store_rounded(out_ptr + s_safe[:, None] * stride_out + cols[None, :], acc,
                       valid[:, None] & mask_n[None, :], ROUND_BF16)


@triton.jit
def moe_combine_kernel(
    y_ptr, ids_ptr, out_ptr, H, TOP_K, E, stride_y, stride_on, stride_oh,
    BLOCK_H: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # out[t] = sum over k of y[t K + k] in fp32, skipping pairs routed to no expert (an id outside [0, E),
    # such as transformers' "no expert" id E): their rows of y were never written.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(0, TOP_K):
        s = t * TOP_K + k
        e = tl.load(ids_ptr + s)
        # The scalar condition broadcast by hand: the interpreter rejects a mask of block & scalar.
        routed = (tl.zeros((BLOCK_H,), dtype=tl.int64) + e >= 0) & (tl.zeros((BLOCK_H,), dtype=tl.int64) + e < E)
        acc += tl.load(y_ptr + s * stride_y + cols, mask=mask & routed, other=0.0).to(tl.float32)
    _store_rounded(out_ptr + t * stride_on + cols * stride_oh, acc, mask, ROUND_BF16)


@triton.jit
def moe_down_backward_kernel(
    dout_ptr, w_ptr, b_ptr, pair_ptr, block_expert_ptr, tw_ptr, gu_ptr, dgu_ptr, dw_part_ptr,
    I, H, TOP_K, N_TILES_I, GU_STEP, GU_UP, alpha, limit,
    stride_dn, stride_dh, stride_we, stride_wh, stride_wi, stride_be, stride_bh, stride_gu, stride_dgu,
    HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # g[s, i] = sum_h dout[t, h] down[e, h, i]  (the gradient of the unweighted expert output y[s] / w[s]
    # pulled back through down). Then, per pair: d(w[s]) = <h[s], g[s]> (this program's partial sum over its
    # BLOCK_N columns of I; the launcher adds the N_TILES_I partials), plus <down_bias[e], dout[t]> in the
    # column-tile-0 programs; d(h) = w[s] g, and the activation's backward from the stored gate and up gives
    # d(gate), d(up), stored in gu's column order. No [S, H] output is kept for d(w).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        s = tl.load(pair_ptr + rows).to(tl.int64)
        valid = s >= 0
        s_safe = tl.where(valid, s, 0)
        tok = s_safe // TOP_K
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < I
        d_rows = dout_ptr + tok[:, None] * stride_dn
        w_cols = w_ptr + e * stride_we + cols.to(tl.int64)[None, :] * stride_wi
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask_k = kk < H
            a = tl.load(d_rows + kk[None, :] * stride_dh, mask=valid[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_cols + kk.to(tl.int64)[:, None] * stride_wh, mask=mask_k[:, None] & mask_n[None, :],
                        other=0.0)
            acc = _mma(a.to(b.dtype), b, acc, ROUND_BF16)
        # <down_bias[e], dout[t]> in a loop of its own, by the column-tile-0 programs only: taken inside the
        # GEMM loop above, the H100 build with num_stages=3 gave wrong d(gate, up) (bf16, clamped, interleaved).
        bias_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if HAS_BIAS:
            if pid_n == 0:
                for k0 in range(0, H, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    mask_k = kk < H
                    a = tl.load(d_rows + kk[None, :] * stride_dh, mask=valid[:, None] & mask_k[None, :], other=0.0)
                    bias = tl.load(b_ptr + e * stride_be + kk * stride_bh, mask=mask_k, other=0.0).to(tl.float32)
                    bias_dot += tl.sum(a.to(tl.float32) * bias[None, :], axis=1)
        mask = valid[:, None] & mask_n[None, :]
        gu_rows = gu_ptr + s_safe[:, None] * stride_gu + (cols * GU_STEP)[None, :]
        gate = tl.load(gu_rows, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gu_rows + GU_UP, mask=mask, other=0.0).to(tl.float32)
        dh = acc * tl.load(tw_ptr + s_safe, mask=valid, other=0.0).to(tl.float32)[:, None]
        h, dgate, dup = _glu_backward(gate, up, dh, alpha, limit, CLAMPED)
        h = _to_dtype_fp32(h, gu_ptr.dtype.element_ty, ROUND_BF16)
        part = tl.sum(h * acc, axis=1) + bias_dot
        tl.store(dw_part_ptr + s_safe * N_TILES_I + pid_n, part, mask=valid)
        dgu_rows = dgu_ptr + s_safe[:, None] * stride_dgu + (cols * GU_STEP)[None, :]
        _store_rounded(dgu_rows, dgate, mask, ROUND_BF16)
        _store_rounded(dgu_rows + GU_UP, dup, mask, ROUND_BF16)


@triton.jit
def expert_weight_grad_kernel(
    l_ptr, r_ptr, tw_ptr, pair_ptr, seg_start_ptr, seg_count_ptr, dw_ptr, lsum_ptr,
    R_DIM, C_DIM, TOP_K, R_UP, alpha, limit,
    stride_ln, stride_lr, stride_rn, stride_rc, stride_de, stride_dr, stride_dc, stride_se, stride_sr,
    L_BY_TOKEN: tl.constexpr, L_SCALED: tl.constexpr, R_BY_TOKEN: tl.constexpr, R_GLU: tl.constexpr,
    CLAMPED: tl.constexpr, COMPUTE_DW: tl.constexpr, HAS_LSUM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # dW[e, r, c] = sum over the pairs s of expert e of L[s, r] * R[s, c], accumulated in fp32 over all of
    # them (an expert with no pairs gets zeros). Rows of L and R are read by pair or by token (s // K):
    #   d down[e]    [H, I]:  L = w[s] * dout[t] (by token, scaled), R = h[s] recomputed from gate, up
    #                         (gate column c at c * stride_rc of gu, up R_UP further)
    #   d gate_up[e] [2I, H]: L = d(gate_up)[s] (by pair), R = x[t] (by token)
    # HAS_LSUM: also lsum[e, r] = sum over the pairs of L[s, r], the bias gradient (d down_bias, d
    # gate_up_bias), stored by the programs of column tile 0. COMPUTE_DW off: only that sum (the launcher
    # then gives one program per row tile).
    e = tl.program_id(0)
    pid = tl.program_id(1)
    if COMPUTE_DW:
        n_c = tl.cdiv(C_DIM, BLOCK_C)
    else:
        n_c = 1
    rr = (pid // n_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    cc = (pid % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = rr < R_DIM
    mask_c = cc < C_DIM
    start = tl.load(seg_start_ptr + e)
    count = tl.load(seg_count_ptr + e)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    lsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for m0 in range(0, count, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        valid = m < count
        s = tl.load(pair_ptr + start + m, mask=valid, other=0).to(tl.int64)
        s = tl.where(valid & (s >= 0), s, 0)
        if L_BY_TOKEN:
            l_row = s // TOP_K
        else:
            l_row = s
        if R_BY_TOKEN:
            r_row = s // TOP_K
        else:
            r_row = s
        lt = tl.load(l_ptr + l_row[None, :] * stride_ln + rr.to(tl.int64)[:, None] * stride_lr,
                     mask=mask_r[:, None] & valid[None, :], other=0.0)  # [BLOCK_R, BLOCK_M]
        if L_SCALED:
            scale = tl.load(tw_ptr + s, mask=valid, other=0.0).to(tl.float32)
            lt = lt.to(tl.float32) * scale[None, :]
            if ROUND_BF16:
                lt = round_fp32_to_bf16_rtne(lt)
            lt = lt.to(dw_ptr.dtype.element_ty)
        if HAS_LSUM:
            lsum += tl.sum(lt.to(tl.float32), axis=1)
        if COMPUTE_DW:
            r_mask = valid[:, None] & mask_c[None, :]
            r_ptrs = r_ptr + r_row[:, None] * stride_rn + cc.to(tl.int64)[None, :] * stride_rc
            if R_GLU:
                gate = tl.load(r_ptrs, mask=r_mask, other=0.0).to(tl.float32)
                up = tl.load(r_ptrs + R_UP, mask=r_mask, other=0.0).to(tl.float32)
                h = _glu(gate, up, alpha, limit, CLAMPED)
                if ROUND_BF16:
                    h = round_fp32_to_bf16_rtne(h)
                rt = h.to(dw_ptr.dtype.element_ty)
            else:
                rt = tl.load(r_ptrs, mask=r_mask, other=0.0)
            acc = _mma(lt.to(rt.dtype), rt, acc, ROUND_BF16)
    if COMPUTE_DW:
        _store_rounded(dw_ptr + e.to(tl.int64) * stride_de + rr.to(tl.int64)[:, None] * stride_dr
                       + cc.to(tl.int64)[None, :] * stride_dc, acc, mask_r[:, None] & mask_c[None, :], ROUND_BF16)
    if HAS_LSUM:
        if pid % n_c == 0:
            _store_rounded(lsum_ptr + e.to(tl.int64) * stride_se + rr * stride_sr, lsum, mask_r, ROUND_BF16)
