"""RMSNorm over head_dim of q and k, then their rotary embedding, in one launch (and one for backward).

Per row x (one token of one head, D elements) with weight w and w_eff = w + weight_offset:

    rstd = 1 / sqrt(mean(x^2) + eps)      xhat = x * rstd      n = xhat * w_eff      (all fp32)
    out_a = n_a * cos_a - n_b * sin_a     out_b = n_b * cos_b + n_a * sin_b

for the pairs (a, b) of the leading R = rotary_dim elements (half-split: a = i, b = i + R/2; interleaved:
a = 2i, b = 2i + 1; i < R/2) and out = n on the elements past R. The norm needs the whole row and the
rotation mixes elements within the row, so one program owns whole rows: it loads each element once, as
the a-lanes, the b-lanes and (when R < D) the tail lanes, sums their squares for rstd and writes out.
n stays fp32 between the two steps (the unfused path rounds it to the input dtype before rotating).
CAST_BEFORE_WEIGHT (the llama form) rounds xhat to the input dtype before the weight multiply, as
LlamaRMSNorm and fastkern.ops.rms_norm do, so the op computes the function its arguments name; the
gemma form multiplies in fp32.
rstd (fp32, one per row) is stored for backward.

Backward, from dout: the gradient of n is the transpose rotation,

    dn_a = dout_a * cos_a + dout_b * sin_b      dn_b = dout_b * cos_b - dout_a * sin_a      (dn = dout past R)

then RMSNorm's backward with xhat recomputed from x and the saved rstd:

    g = dn * w_eff      dx = rstd * (g - xhat * mean(g * xhat))      dw = sum over rows of dn * xhat

(the rounding of CAST_BEFORE_WEIGHT passes gradients through unchanged, as autograd's cast does; dw then
reads the rounded xhat, the value the forward multiplied by w_eff).

dw is reduced across rows: each program takes a contiguous range of rows (BLOCK_T at a time) of one
head block, accumulates its part in fp32 registers and writes one partial row of D; the launcher sums
the partials of q's blocks and of k's blocks (a [groups, blocks, D] fp32 buffer). Without a weight
gradient (frozen norms) that part is compiled out and each program takes one tile.

Grid (both kernels): one axis of (row groups) x (head blocks of q followed by head blocks of k), head
block fastest, so consecutive programs cover neighbouring heads of the same tokens (neighbours in the
[B, T, H, D] layout). Rows are tokens flattened over (B, T); a lane's (b, t) is row // T, row % T, so a
tile may cross a batch boundary. q and k are read through explicit strides (slices of a fused qkv
projection need no copy); outputs, dx and rstd are contiguous [B, T, H, D] / [B, T, H].
"""

import triton
import triton.language as tl

from .bf16 import round_fp32_to_bf16_rtne, round_to


@triton.jit
def _store(ptr, v, mask, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:  # interpreter only (fastkern/kernels/bf16.py)
        v = round_fp32_to_bf16_rtne(v)
    tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_and_tables(cos_ptr, sin_ptr, pos_ptr, start, n_rows, seq_len, offs_a, offs_b, lane_mask,
                     cos_sb, cos_st, cos_sd, sin_sb, sin_st, sin_sd, pos_sb, pos_st,
                     HAS_POSITIONS: tl.constexpr, BLOCK_T: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    # Rows start .. start + BLOCK_T: their mask, (b, t), and the cos/sin of their pairs [BLOCK_T, 1, BLOCK_R].
    rows = start + tl.arange(0, BLOCK_T)
    row_mask = rows < n_rows
    if INT64_OFFSETS:
        rows = rows.to(tl.int64)
    # Masked rows address the last row: every offset formed stays inside the tensors.
    safe = tl.minimum(rows, n_rows - 1)
    bs = safe // seq_len
    ts = safe - bs * seq_len
    if HAS_POSITIONS:
        table_rows = tl.load(pos_ptr + bs * pos_sb + ts * pos_st).to(tl.int64)
        cos_rows = cos_ptr + table_rows * cos_st
        sin_rows = sin_ptr + table_rows * sin_st
    else:
        cos_rows = cos_ptr + bs * cos_sb + ts * cos_st
        sin_rows = sin_ptr + bs * sin_sb + ts * sin_st
    m = row_mask[:, None, None] & lane_mask[None, None, :]
    cos_a = tl.load(cos_rows[:, None, None] + offs_a[None, None, :] * cos_sd, mask=m, other=0.0).to(tl.float32)
    cos_b = tl.load(cos_rows[:, None, None] + offs_b[None, None, :] * cos_sd, mask=m, other=0.0).to(tl.float32)
    sin_a = tl.load(sin_rows[:, None, None] + offs_a[None, None, :] * sin_sd, mask=m, other=0.0).to(tl.float32)
    sin_b = tl.load(sin_rows[:, None, None] + offs_b[None, None, :] * sin_sd, mask=m, other=0.0).to(tl.float32)
    return rows, row_mask, bs, ts, cos_a, cos_b, sin_a, sin_b


@triton.jit
def _lanes(half_rotary, head_dim, INTERLEAVED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    pair = tl.arange(0, BLOCK_R)
    lane_mask = pair < half_rotary
    if INTERLEAVED:
        offs_a = 2 * pair
        offs_b = 2 * pair + 1
    else:
        offs_a = pair
        offs_b = pair + half_rotary
    offs_t = 2 * half_rotary + tl.arange(0, BLOCK_TAIL)
    return lane_mask, offs_a, offs_b, offs_t, offs_t < head_dim


@triton.jit
def _norm_rotate(x_ptr, w_ptr, out_ptr, rstd_ptr, rows, row_mask, bs, ts, heads, n_heads, head_dim, eps,
                 weight_offset, x_sb, x_st, x_sh, x_sd, lane_mask, offs_a, offs_b, offs_t, tail_mask,
                 cos_a, cos_b, sin_a, sin_b, HAS_TAIL: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr,
                 ROUND_BF16: tl.constexpr):
    # One tile [BLOCK_T rows, BLOCK_H heads] of q or of k: x tiles are [BLOCK_T, BLOCK_H, lanes].
    rh_mask = row_mask[:, None] & (heads < n_heads)[None, :]
    pmask = rh_mask[:, :, None] & lane_mask[None, None, :]
    x_row = x_ptr + bs[:, None, None] * x_sb + ts[:, None, None] * x_st + heads[None, :, None] * x_sh
    xa = tl.load(x_row + offs_a[None, None, :] * x_sd, mask=pmask, other=0.0).to(tl.float32)
    xb = tl.load(x_row + offs_b[None, None, :] * x_sd, mask=pmask, other=0.0).to(tl.float32)
    sum_sq = tl.sum(xa * xa, axis=2) + tl.sum(xb * xb, axis=2)
    if HAS_TAIL:
        tmask = rh_mask[:, :, None] & tail_mask[None, None, :]
        xt = tl.load(x_row + offs_t[None, None, :] * x_sd, mask=tmask, other=0.0).to(tl.float32)
        sum_sq += tl.sum(xt * xt, axis=2)
    rstd = 1.0 / tl.sqrt(sum_sq / head_dim + eps)  # [BLOCK_T, BLOCK_H]
    r = rstd[:, :, None]
    wa = tl.load(w_ptr + offs_a, mask=lane_mask, other=0.0).to(tl.float32) + weight_offset
    wb = tl.load(w_ptr + offs_b, mask=lane_mask, other=0.0).to(tl.float32) + weight_offset
    xha = xa * r
    xhb = xb * r
    if CAST_BEFORE_WEIGHT:
        xha = round_to(xha, x_ptr.dtype.element_ty, ROUND_BF16)
        xhb = round_to(xhb, x_ptr.dtype.element_ty, ROUND_BF16)
    na = xha * wa[None, None, :]
    nb = xhb * wb[None, None, :]
    o_row = out_ptr + (rows[:, None, None] * n_heads + heads[None, :, None]) * head_dim
    _store(o_row + offs_a[None, None, :], na * cos_a - nb * sin_a, pmask, ROUND_BF16)
    _store(o_row + offs_b[None, None, :], nb * cos_b + na * sin_b, pmask, ROUND_BF16)
    if HAS_TAIL:
        wt = tl.load(w_ptr + offs_t, mask=tail_mask, other=0.0).to(tl.float32) + weight_offset
        xht = xt * r
        if CAST_BEFORE_WEIGHT:
            xht = round_to(xht, x_ptr.dtype.element_ty, ROUND_BF16)
        _store(o_row + offs_t[None, None, :], xht * wt[None, None, :], tmask, ROUND_BF16)
    tl.store(rstd_ptr + rows[:, None] * n_heads + heads[None, :], rstd, mask=rh_mask)


@triton.jit
def rope_qk_norm_forward_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, q_out_ptr, k_out_ptr, q_rstd_ptr, k_rstd_ptr, cos_ptr, sin_ptr, pos_ptr,
    n_rows, seq_len, n_q_heads, n_k_heads, head_dim, half_rotary, n_q_blocks, eps, weight_offset,
    q_sb, q_st, q_sh, q_sd,
    k_sb, k_st, k_sh, k_sd,
    cos_sb, cos_st, cos_sd,
    sin_sb, sin_st, sin_sd,
    pos_sb, pos_st,
    INTERLEAVED: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # grid: (cdiv(n_rows, BLOCK_T) * n_blocks,), n_blocks = head blocks of q then of k, block fastest.
    pid = tl.program_id(0)
    n_blocks = n_q_blocks + tl.cdiv(n_k_heads, BLOCK_H)
    tile = pid // n_blocks
    block = pid % n_blocks
    lane_mask, offs_a, offs_b, offs_t, tail_mask = _lanes(half_rotary, head_dim, INTERLEAVED, BLOCK_R, BLOCK_TAIL)
    rows, row_mask, bs, ts, cos_a, cos_b, sin_a, sin_b = _rows_and_tables(
        cos_ptr, sin_ptr, pos_ptr, tile * BLOCK_T, n_rows, seq_len, offs_a, offs_b, lane_mask,
        cos_sb, cos_st, cos_sd, sin_sb, sin_st, sin_sd, pos_sb, pos_st, HAS_POSITIONS, BLOCK_T, INT64_OFFSETS)
    if block < n_q_blocks:
        heads = block * BLOCK_H + tl.arange(0, BLOCK_H)
        if INT64_OFFSETS:
            heads = heads.to(tl.int64)
        _norm_rotate(q_ptr, qw_ptr, q_out_ptr, q_rstd_ptr, rows, row_mask, bs, ts, heads, n_q_heads, head_dim, eps,
                     weight_offset, q_sb, q_st, q_sh, q_sd, lane_mask, offs_a, offs_b, offs_t, tail_mask,
                     cos_a, cos_b, sin_a, sin_b, HAS_TAIL, CAST_BEFORE_WEIGHT, ROUND_BF16)
    else:
        heads = (block - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        if INT64_OFFSETS:
            heads = heads.to(tl.int64)
        _norm_rotate(k_ptr, kw_ptr, k_out_ptr, k_rstd_ptr, rows, row_mask, bs, ts, heads, n_k_heads, head_dim, eps,
                     weight_offset, k_sb, k_st, k_sh, k_sd, lane_mask, offs_a, offs_b, offs_t, tail_mask,
                     cos_a, cos_b, sin_a, sin_b, HAS_TAIL, CAST_BEFORE_WEIGHT, ROUND_BF16)


@triton.jit
def _norm_rotate_backward(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, cos_ptr, sin_ptr, pos_ptr,
    first, last, seq_len, heads, n_heads, head_dim, half_rotary, weight_offset,
    dy_sb, dy_st, dy_sh, dy_sd, x_sb, x_st, x_sh, x_sd,
    cos_sb, cos_st, cos_sd, sin_sb, sin_st, sin_sd, pos_sb, pos_st,
    INTERLEAVED: tl.constexpr, HAS_POSITIONS: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_WEIGHT_GRAD: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_TAIL: tl.constexpr, INT64_OFFSETS: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # Rows first .. last of one head block of q or k; writes dx and (HAS_WEIGHT_GRAD) the partial dw row
    # at dw_ptr. Masked lanes load 0 for x, dy and rstd, so they add nothing to dw. The dw terms add up
    # elementwise in tile-shaped fp32 accumulators and are reduced over tokens and heads once, after the
    # loop: a reduction across the tile's warps per iteration (through shared memory, with barriers)
    # would sit on the loop's critical path.
    lane_mask, offs_a, offs_b, offs_t, tail_mask = _lanes(half_rotary, head_dim, INTERLEAVED, BLOCK_R, BLOCK_TAIL)
    wa = tl.load(w_ptr + offs_a, mask=lane_mask, other=0.0).to(tl.float32)[None, None, :] + weight_offset
    wb = tl.load(w_ptr + offs_b, mask=lane_mask, other=0.0).to(tl.float32)[None, None, :] + weight_offset
    wt = tl.load(w_ptr + offs_t, mask=tail_mask, other=0.0).to(tl.float32)[None, None, :] + weight_offset
    dw_a = tl.zeros((BLOCK_T, BLOCK_H, BLOCK_R), dtype=tl.float32)
    dw_b = tl.zeros((BLOCK_T, BLOCK_H, BLOCK_R), dtype=tl.float32)
    dw_t = tl.zeros((BLOCK_T, BLOCK_H, BLOCK_TAIL), dtype=tl.float32)
    head_mask = heads < n_heads
    for start in range(first, last, BLOCK_T):
        rows, row_mask, bs, ts, cos_a, cos_b, sin_a, sin_b = _rows_and_tables(
            cos_ptr, sin_ptr, pos_ptr, start, last, seq_len, offs_a, offs_b, lane_mask,
            cos_sb, cos_st, cos_sd, sin_sb, sin_st, sin_sd, pos_sb, pos_st, HAS_POSITIONS, BLOCK_T, INT64_OFFSETS)
        rh_mask = row_mask[:, None] & head_mask[None, :]
        pmask = rh_mask[:, :, None] & lane_mask[None, None, :]
        x_row = x_ptr + bs[:, None, None] * x_sb + ts[:, None, None] * x_st + heads[None, :, None] * x_sh
        d_row = dy_ptr + bs[:, None, None] * dy_sb + ts[:, None, None] * dy_st + heads[None, :, None] * dy_sh
        r = tl.load(rstd_ptr + rows[:, None] * n_heads + heads[None, :], mask=rh_mask, other=0.0)[:, :, None]
        xha = tl.load(x_row + offs_a[None, None, :] * x_sd, mask=pmask, other=0.0).to(tl.float32) * r
        xhb = tl.load(x_row + offs_b[None, None, :] * x_sd, mask=pmask, other=0.0).to(tl.float32) * r
        da = tl.load(d_row + offs_a[None, None, :] * dy_sd, mask=pmask, other=0.0).to(tl.float32)
        db = tl.load(d_row + offs_b[None, None, :] * dy_sd, mask=pmask, other=0.0).to(tl.float32)
        # The transpose rotation: the gradient of n from the gradient of out.
        dna = da * cos_a + db * sin_b
        dnb = db * cos_b - da * sin_a
        ga = dna * wa
        gb = dnb * wb
        dot = tl.sum(ga * xha, axis=2) + tl.sum(gb * xhb, axis=2)
        if HAS_TAIL:
            tmask = rh_mask[:, :, None] & tail_mask[None, None, :]
            xht = tl.load(x_row + offs_t[None, None, :] * x_sd, mask=tmask, other=0.0).to(tl.float32) * r
            dnt = tl.load(d_row + offs_t[None, None, :] * dy_sd, mask=tmask, other=0.0).to(tl.float32)
            gt = dnt * wt
            dot += tl.sum(gt * xht, axis=2)
        c = (dot / head_dim)[:, :, None]  # mean(g * xhat) per row
        o_row = dx_ptr + (rows[:, None, None] * n_heads + heads[None, :, None]) * head_dim
        _store(o_row + offs_a[None, None, :], r * (ga - xha * c), pmask, ROUND_BF16)
        _store(o_row + offs_b[None, None, :], r * (gb - xhb * c), pmask, ROUND_BF16)
        if HAS_TAIL:
            _store(o_row + offs_t[None, None, :], r * (gt - xht * c), tmask, ROUND_BF16)
        if HAS_WEIGHT_GRAD:
            if CAST_BEFORE_WEIGHT:
                xha = round_to(xha, x_ptr.dtype.element_ty, ROUND_BF16)
                xhb = round_to(xhb, x_ptr.dtype.element_ty, ROUND_BF16)
            dw_a += dna * xha
            dw_b += dnb * xhb
            if HAS_TAIL:
                if CAST_BEFORE_WEIGHT:
                    xht = round_to(xht, x_ptr.dtype.element_ty, ROUND_BF16)
                dw_t += dnt * xht
    if HAS_WEIGHT_GRAD:
        # a-lanes, b-lanes and tail lanes together cover the D columns of the partial row once each.
        tl.store(dw_ptr + offs_a, tl.sum(tl.sum(dw_a, axis=1), axis=0), mask=lane_mask)
        tl.store(dw_ptr + offs_b, tl.sum(tl.sum(dw_b, axis=1), axis=0), mask=lane_mask)
        if HAS_TAIL:
            tl.store(dw_ptr + offs_t, tl.sum(tl.sum(dw_t, axis=1), axis=0), mask=tail_mask)


@triton.jit
def rope_qk_norm_backward_kernel(
    gq_ptr, gk_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, q_rstd_ptr, k_rstd_ptr, dq_ptr, dk_ptr, dw_partial_ptr,
    cos_ptr, sin_ptr, pos_ptr,
    n_rows, seq_len, rows_per_program, n_q_heads, n_k_heads, head_dim, half_rotary, n_q_blocks, weight_offset,
    gq_sb, gq_st, gq_sh, gq_sd,
    gk_sb, gk_st, gk_sh, gk_sd,
    q_sb, q_st, q_sh, q_sd,
    k_sb, k_st, k_sh, k_sd,
    cos_sb, cos_st, cos_sd,
    sin_sb, sin_st, sin_sd,
    pos_sb, pos_st,
    INTERLEAVED: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_WEIGHT_GRAD: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # gq_ptr / gk_ptr: incoming gradients of q_out / k_out (any strides); dq_ptr / dk_ptr: the
    # gradients of q / k (contiguous). grid: (groups * n_blocks,), block fastest; group g owns rows
    # [g * rows_per_program, (g + 1) * rows_per_program) and writes partial row (g, block) of dw.
    pid = tl.program_id(0)
    n_blocks = n_q_blocks + tl.cdiv(n_k_heads, BLOCK_H)
    group = pid // n_blocks
    block = pid % n_blocks
    first = group * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    dw_ptr = dw_partial_ptr + pid * head_dim  # [groups, n_blocks, D] contiguous: row pid
    if block < n_q_blocks:
        heads = block * BLOCK_H + tl.arange(0, BLOCK_H)
        if INT64_OFFSETS:
            heads = heads.to(tl.int64)
        _norm_rotate_backward(gq_ptr, q_ptr, qw_ptr, q_rstd_ptr, dq_ptr, dw_ptr, cos_ptr, sin_ptr, pos_ptr,
                              first, last, seq_len, heads, n_q_heads, head_dim, half_rotary, weight_offset,
                              gq_sb, gq_st, gq_sh, gq_sd, q_sb, q_st, q_sh, q_sd,
                              cos_sb, cos_st, cos_sd, sin_sb, sin_st, sin_sd, pos_sb, pos_st,
                              INTERLEAVED, HAS_POSITIONS, HAS_TAIL, HAS_WEIGHT_GRAD, CAST_BEFORE_WEIGHT, BLOCK_T,
                              BLOCK_H, BLOCK_R, BLOCK_TAIL,
                              INT64_OFFSETS, ROUND_BF16)
    else:
        heads = (block - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        if INT64_OFFSETS:
            heads = heads.to(tl.int64)
        _norm_rotate_backward(gk_ptr, k_ptr, kw_ptr, k_rstd_ptr, dk_ptr, dw_ptr, cos_ptr, sin_ptr, pos_ptr,
                              first, last, seq_len, heads, n_k_heads, head_dim, half_rotary, weight_offset,
                              gk_sb, gk_st, gk_sh, gk_sd, k_sb, k_st, k_sh, k_sd,
                              cos_sb, cos_st, cos_sd, sin_sb, sin_st, sin_sd, pos_sb, pos_st,
                              INTERLEAVED, HAS_POSITIONS, HAS_TAIL, HAS_WEIGHT_GRAD, CAST_BEFORE_WEIGHT, BLOCK_T,
                              BLOCK_H, BLOCK_R, BLOCK_TAIL,
                              INT64_OFFSETS, ROUND_BF16)
