"""Rotary position embedding of q and k in one launch: out = x * cos + rot(x) * sin.

rot pairs element a with element b of each head: half-split (transformers' rotate_half) pairs
i with i + R/2, interleaved (GPT-J) pairs 2i with 2i + 1, for i < R/2 where R = rotary_dim. Elements
past R are not touched. With cos/sin given per element (cos[a], cos[b]) the forward is

    out_a = x_a * cos_a - x_b * sin_a
    out_b = x_b * cos_b + x_a * sin_b

and backward is its transpose (TRANSPOSE=True):

    dx_a = g_a * cos_a + g_b * sin_b
    dx_b = g_b * cos_b - g_a * sin_a

which is the rotation by -theta when cos_a = cos_b and sin_a = sin_b (transformers' layout), and the
exact gradient for any cos/sin otherwise.

Grid: one axis of (B * cdiv(T, BLOCK_T)) token tiles x (head blocks of q followed by head blocks of
k). Each program rotates BLOCK_H heads of BLOCK_T consecutive tokens, so q and k share one launch and
the tokens' cos/sin rows (from a [B or 1, T, R] tensor, or [max_pos, R] table rows picked by
position_ids[b, t]) are read once per program. HEADS_FASTEST orders the programs head block first:
consecutive programs then cover neighbouring heads of the same tokens, which are neighbours in
memory for the [B, T, H, D] projection layout (so DRAM pages are walked in order rather than in
strides of one head block); otherwise token tiles vary fastest. One axis, because the token tiles
alone can exceed the 65535 limit of a second grid axis. Strides are explicit, so
transposed views [B, H, T, D] of [B, T, H, D] projections need no copy; out may alias x (in place:
each program loads all its elements before storing them, and programs own disjoint elements).
"""

import triton
import triton.language as tl

from .bf16 import round_fp32_to_bf16_rtne


@triton.jit
def _rotate_head_block(
    x_ptr, out_ptr, b, ts, heads, n_heads, t_mask,
    x_sb, x_sh, x_st, x_sd, o_sb, o_sh, o_st, o_sd,
    offs_a, offs_b, lane_mask, cos_a, sin_a, cos_b, sin_b,
    TRANSPOSE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # ts: [BLOCK_T]; heads: [BLOCK_H]; offs_a / offs_b / lane_mask: [BLOCK_R];
    # cos_* / sin_*: [BLOCK_T, 1, BLOCK_R] fp32; x tiles: [BLOCK_T, BLOCK_H, BLOCK_R].
    mask = t_mask[:, None, None] & (heads < n_heads)[None, :, None] & lane_mask[None, None, :]
    x_row = x_ptr + b * x_sb + ts[:, None, None] * x_st + heads[None, :, None] * x_sh
    o_row = out_ptr + b * o_sb + ts[:, None, None] * o_st + heads[None, :, None] * o_sh
    xa = tl.load(x_row + offs_a[None, None, :] * x_sd, mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(x_row + offs_b[None, None, :] * x_sd, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSE:
        ya = xa * cos_a + xb * sin_b
        yb = xb * cos_b - xa * sin_a
    else:
        ya = xa * cos_a - xb * sin_a
        yb = xb * cos_b + xa * sin_b
    if ROUND_BF16:  # interpreter only (fastkern/kernels/bf16.py)
        ya = round_fp32_to_bf16_rtne(ya)
        yb = round_fp32_to_bf16_rtne(yb)
    tl.store(o_row + offs_a[None, None, :] * o_sd, ya.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + offs_b[None, None, :] * o_sd, yb.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_qk_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr,
    seq_len, n_t_blocks, n_q_heads, n_k_heads, half_rotary, n_q_blocks,
    q_sb, q_sh, q_st, q_sd,
    k_sb, k_sh, k_st, k_sd,
    qo_sb, qo_sh, qo_st, qo_sd,
    ko_sb, ko_sh, ko_st, ko_sd,
    cos_sb, cos_st, cos_sd,
    sin_sb, sin_st, sin_sd,
    pos_sb, pos_st,
    INTERLEAVED: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HEADS_FASTEST: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    # grid: (B * n_t_blocks * n_blocks,), n_blocks = head blocks of q then of k; a program covers
    # BLOCK_T tokens of one row and BLOCK_H heads.
    pid = tl.program_id(0)
    n_blocks = n_q_blocks + tl.cdiv(n_k_heads, BLOCK_H)
    if HEADS_FASTEST:
        tile = pid // n_blocks
        block = pid % n_blocks
    else:
        n_tiles = tl.num_programs(0) // n_blocks
        tile = pid % n_tiles
        block = pid // n_tiles
    b = tile // n_t_blocks
    ts = (tile % n_t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = ts < seq_len
    if INT64_OFFSETS:
        b = b.to(tl.int64)
        ts = ts.to(tl.int64)

    pair = tl.arange(0, BLOCK_R)
    lane_mask = pair < half_rotary
    if INTERLEAVED:
        offs_a = 2 * pair
        offs_b = 2 * pair + 1
    else:
        offs_a = pair
        offs_b = pair + half_rotary

    # cos/sin rows of these tokens: per-token tensor [B or 1, T, R], or table rows position_ids[b, t].
    if HAS_POSITIONS:
        rows = tl.load(pos_ptr + b * pos_sb + ts * pos_st, mask=t_mask, other=0).to(tl.int64)
        cos_rows = cos_ptr + rows * cos_st
        sin_rows = sin_ptr + rows * sin_st
    else:
        cos_rows = cos_ptr + b * cos_sb + ts * cos_st
        sin_rows = sin_ptr + b * sin_sb + ts * sin_st
    cs_mask = t_mask[:, None, None] & lane_mask[None, None, :]
    cos_a = tl.load(cos_rows[:, None, None] + offs_a[None, None, :] * cos_sd, mask=cs_mask, other=0.0).to(tl.float32)
    cos_b = tl.load(cos_rows[:, None, None] + offs_b[None, None, :] * cos_sd, mask=cs_mask, other=0.0).to(tl.float32)
    sin_a = tl.load(sin_rows[:, None, None] + offs_a[None, None, :] * sin_sd, mask=cs_mask, other=0.0).to(tl.float32)
    sin_b = tl.load(sin_rows[:, None, None] + offs_b[None, None, :] * sin_sd, mask=cs_mask, other=0.0).to(tl.float32)

    if block < n_q_blocks:
        heads = block * BLOCK_H + tl.arange(0, BLOCK_H)
        if INT64_OFFSETS:
            heads = heads.to(tl.int64)
        _rotate_head_block(q_ptr, q_out_ptr, b, ts, heads, n_q_heads, t_mask,
                           q_sb, q_sh, q_st, q_sd, qo_sb, qo_sh, qo_st, qo_sd,
                           offs_a, offs_b, lane_mask, cos_a, sin_a, cos_b, sin_b, TRANSPOSE, ROUND_BF16)
    else:
        heads = (block - n_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        if INT64_OFFSETS:
            heads = heads.to(tl.int64)
        _rotate_head_block(k_ptr, k_out_ptr, b, ts, heads, n_k_heads, t_mask,
                           k_sb, k_sh, k_st, k_sd, ko_sb, ko_sh, ko_st, ko_sd,
                           offs_a, offs_b, lane_mask, cos_a, sin_a, cos_b, sin_b, TRANSPOSE, ROUND_BF16)
