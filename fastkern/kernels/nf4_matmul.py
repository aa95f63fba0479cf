"""GEMM with an NF4 (bitsandbytes layout) operand dequantized inside its tiles.

out[M, P] = x[M, R] @ B[R, P], where B is the NF4 weight W [N, K] read as W.T (TRANSPOSE_W=False:
R = K, P = N, a Linear layer's forward) or as W itself (TRANSPOSE_W=True: R = N, P = K, the layer's
grad_input). The 16-bit weight never exists in memory: each program dequantizes the [BLOCK_R,
BLOCK_P] tile of B it needs, in registers, right before the tile's tl.dot.

W's element (n, k) is flat index j = n * K + k; its 4-bit code is the HIGH nibble of byte j // 2
when j is even and the low nibble when j is odd, and its value is fp32(code[nibble] * scale[j //
BLOCKSIZE]), rounded to x's dtype. With double quantization the scale is rebuilt as
fp32(fp32(code2[q] * absmax2[b // NESTED_BLOCKSIZE]) + offset). The launcher turns off FMA
contraction, so every value is bit-identical to what fastkern/kernels/nf4.py (and bitsandbytes)
produce; the only difference from dequantize-then-GEMM is the order of the fp32 accumulation.

The nibble is chosen per element from j's parity rather than by splitting whole bytes: K may be odd,
and then consecutive rows of W start alternately on a high and on a low nibble, so a tile's bytes do
not line up with its rows.

Scales: with LINE_SCALES (K a multiple of BLOCKSIZE and the tile's extent along W's rows a divisor
of BLOCKSIZE) every W row segment in a tile lies inside one scale block, so the scale is loaded once
per tile line instead of once per element. Otherwise it is gathered per element.
"""

import triton
import triton.language as tl

from .bf16 import round_fp32_to_bf16_rtne


@triton.jit
def _scale_at(blk, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
              NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    # The fp32 absmax of scale block(s) `blk`. Masked lanes read 0 (or, nested, code2[0] * 0 +
    # offset): finite values, so the zeros the x tile holds there multiply to 0, never to NaN.
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        absmax2 = tl.load(absmax2_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(code2_ptr + q) * absmax2
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def nf4_matmul_kernel(
    x_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
    M, P, R, W_COLS,
    stride_xm, stride_xr, stride_om,
    TRANSPOSE_W: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    LINE_SCALES: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped launch order: GROUP_M consecutive programs share one column tile of B, so its 4-bit
    # bytes are read from HBM about once and served from L2 to the other row tiles.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_p = tl.cdiv(P, BLOCK_P)
    per_group = GROUP_M * num_pid_p
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_p = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x / out
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P] columns of out
    if INT64_OFFSETS:
        offs_m = offs_m.to(tl.int64)
        offs_p = offs_p.to(tl.int64)
    mask_m = offs_m < M
    mask_p = offs_p < P

    # First column of the program's tile (used by LINE_SCALES with TRANSPOSE_W: a tile line is W row
    # r, columns [col0, col0 + BLOCK_P), inside one scale block).
    col0 = pid_p * BLOCK_P
    if INT64_OFFSETS:
        col0 = col0.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R] reduction indices
        if INT64_OFFSETS:
            offs_r = offs_r.to(tl.int64)
        mask_r = offs_r < R

        # x tile [BLOCK_M, BLOCK_R]; lanes past M or R read 0.
        x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_r[None, :] * stride_xr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)

        # B tile [BLOCK_R, BLOCK_P] as flat indices j into W.
        mask_w = mask_r[:, None] & mask_p[None, :]
        if TRANSPOSE_W:
            j = offs_r[:, None] * W_COLS + offs_p[None, :]  # B[r, p] = W[r, p]
        else:
            j = offs_p[None, :] * W_COLS + offs_r[:, None]  # B[r, p] = W[p, r]
        byte = tl.load(packed_ptr + (j >> 1), mask=mask_w, other=0).to(tl.int32)
        nibble = tl.where((j & 1) == 0, byte >> 4, byte & 15)
        level = tl.load(code_ptr + nibble)  # [BLOCK_R, BLOCK_P] fp32

        if LINE_SCALES:
            if TRANSPOSE_W:
                blk = (offs_r * W_COLS + col0) // BLOCKSIZE  # [BLOCK_R]
                scale = _scale_at(blk, mask_r, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                  NESTED, NESTED_BLOCKSIZE)[:, None]
            else:
                blk = (offs_p * W_COLS + r0) // BLOCKSIZE  # [BLOCK_P]
                scale = _scale_at(blk, mask_p, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                  NESTED, NESTED_BLOCKSIZE)[None, :]
        else:
            scale = _scale_at(j // BLOCKSIZE, mask_w, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                              NESTED, NESTED_BLOCKSIZE)  # [BLOCK_R, BLOCK_P]
        w = level * scale  # fp32, one rounding, as nf4_dequantize

        if INTERPRET_BF16:
            # Triton's CPU interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even)
            # and its tl.dot multiplies bf16 operands as their raw uint16 bits: round by hand, then
            # multiply in fp32, which is exact for bf16 products, like the GPU's MMA.
            w_tile = round_fp32_to_bf16_rtne(w)  # bf16 values, held in fp32
            acc = tl.dot(x_tile.to(tl.float32), w_tile, acc, input_precision="ieee")
        elif x_tile.dtype == tl.float32:
            # fp32 inputs: a true fp32 product (no TF32), like torch's default matmul.
            acc = tl.dot(x_tile, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x_tile, w.to(x_tile.dtype), acc)

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_p[None, :]
    if INTERPRET_BF16:
        result = round_fp32_to_bf16_rtne(acc).to(tl.bfloat16)
    else:
        result = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptrs, result, mask=mask_m[:, None] & mask_p[None, :])
