"""NF4 dequantization (bitsandbytes layout) into a 16/32-bit row-major buffer.

Memory-bound: per weight element 0.5 byte of codes read, 2 bytes written (bf16), plus 1/blocksize
of a scale. Each program owns BLOCK consecutive weight elements (a whole number of scale blocks);
it splits every byte into its high nibble (even element) and low nibble (odd element), looks both
up in the 16-entry code table, multiplies by the block's scale, and interleaves the two halves back
into element order so the store is one contiguous vector.

The scale of an element is absmax[e // blocksize]; with double quantization it is rebuilt on the
fly as fp32(code2[q] * absmax2[b // 256]) + offset. The launcher turns off FMA contraction so both
roundings happen exactly as in bitsandbytes (bit-exact results).

The output may have a row stride larger than the weight's column count (OUT_ROW_STRIDE != n_cols):
the LoRA layer dequantizes straight into a [N, K + r] buffer whose last r columns hold lora_B.
"""

import triton
import triton.language as tl

from .bf16 import round_fp32_to_bf16_rtne


@triton.jit
def nf4_dequantize_kernel(
    packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
    n_elements, n_cols, out_row_stride,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    OUT_MODE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
    EVEN: tl.constexpr,
    STORE_CACHE: tl.constexpr = "",
):
    # STORE_CACHE: the stores' cache modifier ("" or ".cs", streaming: the output is written once
    # and read by a later GEMM, so keeping it in L2 buys nothing); a bench sweep compares both.
    # The program's BLOCK elements are NB whole scale blocks: a [NB, BLOCKSIZE // 2] tile of bytes,
    # so each scale is computed once per block (not once per byte) and broadcast along the row.
    NB: tl.constexpr = BLOCK // BLOCKSIZE
    HB: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0)
    if INT64_OFFSETS:
        pid = pid.to(tl.int64)
    blk = pid * NB + tl.arange(0, NB)  # [NB] scale-block indices
    byte = blk[:, None] * HB + tl.arange(0, HB)[None, :]  # [NB, HB] packed byte indices
    # EVEN: n_elements is a multiple of BLOCK, so no lane is out of bounds and the masks (one compare
    # per element, and predicated memory instructions) are compiled out.
    if EVEN:
        packed = tl.load(packed_ptr + byte).to(tl.int32)
    else:
        packed = tl.load(packed_ptr + byte, mask=byte * 2 < n_elements, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (packed >> 4))  # even elements
    lo = tl.load(code_ptr + (packed & 15))  # odd elements

    if EVEN:
        blk_mask = None
    else:
        blk_mask = blk * BLOCKSIZE < n_elements
    # Masked-off lanes read absmax index 0 and absmax2 block 0: valid addresses, results never stored.
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=blk_mask).to(tl.int32)
        absmax2 = tl.load(absmax2_ptr + blk // NESTED_BLOCKSIZE, mask=blk_mask)
        scale = tl.load(code2_ptr + (q & 255)) * absmax2
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=blk_mask)
    scale = scale[:, None]

    values = tl.reshape(tl.interleave(hi * scale, lo * scale), (BLOCK,))  # fp32, element order
    if ROUND_BF16:
        values = round_fp32_to_bf16_rtne(values).to(tl.bfloat16)  # interpreter only (kernels/bf16.py)
    else:
        values = values.to(out_ptr.dtype.element_ty)
    start = pid * BLOCK
    elem = start + tl.arange(0, BLOCK)
    if EVEN:
        mask = None
    else:
        mask = elem < n_elements
    if OUT_MODE == 0:  # contiguous output
        tl.store(out_ptr + elem, values, mask=mask, cache_modifier=STORE_CACHE)
    elif OUT_MODE == 1:  # strided rows, n_cols a multiple of BLOCK: the program stays inside one row
        row = start // n_cols
        col = start - row * n_cols + tl.arange(0, BLOCK)
        tl.store(out_ptr + row * out_row_stride + col, values, mask=mask, cache_modifier=STORE_CACHE)
    else:  # strided rows, general: per-element row and column
        row = elem // n_cols
        col = elem - row * n_cols
        tl.store(out_ptr + row * out_row_stride + col, values, mask=mask, cache_modifier=STORE_CACHE)
