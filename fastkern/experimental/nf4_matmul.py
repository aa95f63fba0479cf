"""x @ W.T and x @ W for an NF4 (bitsandbytes format) weight W, dequantized inside the GEMM's tiles.

Experimental, not exported by fastkern.ops and used by no patcher: correct, but on an H100 it runs
38-83x slower than ``nf4_dequantize`` followed by a cuBLAS GEMM (what ``lora_linear`` does; numbers
in docs/nf4_lora.md, bench/cases/nf4.py). The Triton kernel in fastkern/kernels/nf4_matmul.py reads
W's 4-bit codes once per tile and never writes the 16-bit weight to memory.

Tiers: ``_matmul_impl`` (dispatch per call: Triton kernel on CUDA, the same kernel under Triton's
interpreter on CPU with TRITON_INTERPRET=1, the PyTorch reference otherwise; fp64 always takes the
reference); one autograd definition (``_setup_context`` / ``_backward``) that fastkern/ops/_autograd.py
turns into the custom op ``fastkern::nf4_matmul`` (fake and autograd registered: what torch.compile
sees) and the eager autograd.Function that eager calls take (custom-op dispatch costs host time:
docs/benchmarks.md, "Host cost of an op call"); and :func:`nf4_matmul`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops._autograd import AutogradOp, backward_dispatch
from ..ops._common import (FLOAT_DTYPES, INT32_MAX, KERNEL_DTYPES, as_rows, cdiv,
                           check_tensor, device_guard, needs_int64, op_path, output_buffer)
from ..ops.nf4 import flatten_state
from ..reference.nf4 import block_scales_reference, nf4_matmul_reference

_GROUP_M = 8


def launch_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_P, BLOCK_R, num_warps, num_stages) on the GPU for out [m, n] = x [m, k] @ B [k, n].

    Not tuned: 64x64x64 tiles, 4 warps, 3 stages, and 16- or 32-row tiles when M is small so fewer
    rows are masked off (the GPU numbers in docs/nf4_lora.md are at this config; the tile build, not
    the tile size, is what costs there). tl.dot needs every tile dim >= 16.
    """
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return block_m, 64, 64, 4, 3


def _interpreter_config(m: int, n: int, k: int) -> tuple[int, int, int]:
    # Under the interpreter a program costs its Python overhead, nearly independent of the tile
    # size: tiles as large as the problem (capped, so masked lanes stay a small share) are fastest.
    def fit(size: int, cap: int) -> int:
        return min(cap, max(16, 1 << (max(size, 1) - 1).bit_length()))

    return fit(m, 64), fit(n, 128), fit(k, 128)


def matmul_into(out: Tensor, x: Tensor, packed: Tensor, code: Tensor, absmax: Tensor, absmax2: Tensor | None,
                code2: Tensor | None, offset: Tensor | None, blocksize: int, nested_blocksize: int, n_rows: int,
                n_cols: int, transpose: bool, *, block_m: int | None = None, block_p: int | None = None,
                block_r: int | None = None, num_warps: int | None = None, num_stages: int | None = None) -> None:
    """Launch the kernel: out [M, P] (unit column stride) = x [M, R] (any strides) @ B.

    B is W.T ([n_cols, n_rows]) or, with ``transpose``, W ([n_rows, n_cols]). The block sizes and
    launch options default to ``launch_config`` (GPU) or the interpreter's choice; the tests and the
    bench may override them.
    """
    from ..kernels.nf4_matmul import nf4_matmul_kernel

    m, r = x.shape
    p = out.shape[1]
    assert out.stride(1) == 1, "matmul_into needs a unit column stride for out"
    interpreted = op_path(x) == "interpreter"
    if interpreted:
        bm, bp, br = _interpreter_config(m, p, r)
        warps, stages = 4, 1
    else:
        bm, bp, br, warps, stages = launch_config(m, p, r)
    bm, bp, br = block_m or bm, block_p or bp, block_r or br
    warps, stages = num_warps or warps, num_stages or stages
    nested = absmax2 is not None
    # One scale per tile line when every W row segment in a tile stays inside one scale block: rows
    # of W start on block boundaries (K % blocksize == 0) and the tile's extent along a W row (BLOCK_R
    # for W.T, BLOCK_P for W) divides the blocksize.
    along_row = bp if transpose else br
    line_scales = n_cols % blocksize == 0 and blocksize % along_row == 0
    # Offsets masked lanes can reach: a tile past the end of x/out, and flat indices j up to
    # (rows + tile) * cols of W.
    int64 = (needs_int64(x, out, slack=max(bm, bp, br))
             or (n_rows + max(bp, br)) * (n_cols + max(bp, br)) >= INT32_MAX)
    round_by_hand = interpreted and x.dtype == torch.bfloat16
    grid = (cdiv(m, bm) * cdiv(p, bp),)
    with device_guard(x):
        nf4_matmul_kernel[grid](
            x, packed, code, absmax, absmax2 if nested else absmax, code2 if nested else code,
            offset if nested else code, out,
            m, p, r, n_cols,
            x.stride(0), x.stride(1), out.stride(0),
            TRANSPOSE_W=bool(transpose), BLOCKSIZE=blocksize, NESTED=nested,
            NESTED_BLOCKSIZE=max(nested_blocksize, 1), LINE_SCALES=line_scales, INTERPRET_BF16=round_by_hand,
            INT64_OFFSETS=int64, BLOCK_M=bm, BLOCK_P=bp, BLOCK_R=br, GROUP_M=_GROUP_M,
            num_warps=warps, num_stages=stages,
            # No FMA contraction: the nested scale's multiply-add is rounded twice, as in nf4_dequantize.
            enable_fp_fusion=False,
        )


def _matmul_impl(x: Tensor, packed: Tensor, code: Tensor, absmax: Tensor, absmax2: Tensor | None,
                 code2: Tensor | None, offset: Tensor | None, blocksize: int, nested_blocksize: int, n_rows: int,
                 n_cols: int, transpose: bool) -> Tensor:
    """x [..., R] -> out [..., P], contiguous, in x's dtype."""
    p = n_cols if transpose else n_rows
    x2 = as_rows(x)
    m, r = x2.shape
    if x2.numel() == 0 or op_path(x) == "reference":
        scales = block_scales_reference(absmax, nested_blocksize, code2, absmax2, offset)
        out = nf4_matmul_reference(x2, packed, code, scales, blocksize, n_rows, n_cols, transpose)
        return out.reshape(*x.shape[:-1], p).clone(memory_format=torch.contiguous_format)
    # Allocated in its final shape and written through a [M, P] view, so the op returns a plain tensor,
    # not a view made inside the autograd Function (which autograd forbids modifying in place).
    out = output_buffer((*x.shape[:-1], p), x.dtype, x.device)
    matmul_into(out.view(m, p), x2, packed, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize,
                n_rows, n_cols, transpose)
    return out


def _fake_matmul(x, packed, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize, n_rows, n_cols,
                 transpose):
    return x.new_empty((*x.shape[:-1], n_cols if transpose else n_rows))


def _setup_context(ctx, inputs, output):
    x, packed, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize, n_rows, n_cols, transpose = inputs
    ctx.save_for_backward(packed, code, absmax, absmax2, code2, offset)
    ctx.meta = (blocksize, nested_blocksize, n_rows, n_cols, transpose)
    ctx.x_dtype = x.dtype


def _backward(ctx, grad_out):
    # d(x @ B)/dx applied to grad_out is grad_out @ B.T: the same op with ``transpose`` flipped,
    # differentiable again (double backward) when autograd records the backward.
    blocksize, nested_blocksize, n_rows, n_cols, transpose = ctx.meta
    grad_x = _matmul_back(grad_out.to(ctx.x_dtype), *ctx.saved_tensors, blocksize, nested_blocksize, n_rows,
                          n_cols, not transpose)
    return (grad_x,) + (None,) * 11


_NF4_MATMUL = AutogradOp("nf4_matmul", _matmul_impl, fake=_fake_matmul, setup_context=_setup_context,
                         backward=_backward)
nf4_matmul_op = _NF4_MATMUL.op
NF4MatmulFunction = _NF4_MATMUL.function


def _apply(x: Tensor, *quant_and_transpose) -> Tensor:
    if torch.compiler.is_compiling():
        return nf4_matmul_op(x, *quant_and_transpose)
    if torch.is_grad_enabled() and x.requires_grad:
        return NF4MatmulFunction.apply(x, *quant_and_transpose)
    # Nothing to differentiate: skip autograd.Function's bookkeeping (host time).
    return _matmul_impl(x, *quant_and_transpose)


# The backward's product: the custom op inside the custom op's registered backward (traced graphs hold
# the opaque op), the eager route (Function only when a graph is recorded) inside the eager Function's.
_matmul_back = backward_dispatch(nf4_matmul_op, _apply)


def nf4_matmul(x: Tensor, packed: Tensor, quant_state, *, transpose: bool = False) -> Tensor:
    """``x @ W.T`` (or ``x @ W`` with ``transpose=True``) for an NF4 weight W, without a 16-bit copy of W.

    W is the weight described by ``packed`` (bitsandbytes' packed bytes, any quant_storage dtype)
    and ``quant_state`` (a bitsandbytes ``QuantState`` or :class:`NF4State`, nested or not); its
    logical shape is ``quant_state.shape`` = [N, K] (a transposed ``(1, n)`` view of ``packed`` is
    read as the same bytes; it does not transpose W). W's values are exactly those of
    ``nf4_dequantize(packed, quant_state, dtype=x.dtype)``; products accumulate in fp32.

    x: [..., K] -> [..., N] (a Linear layer's forward), or with ``transpose`` [..., N] -> [..., K] (the
    layer's grad_input). x is fp16/bf16/fp32 (fp64 runs the PyTorch reference), any strides; the
    output is contiguous, in x's dtype. Differentiable in x; packed and quant_state are frozen.

    Experimental: correct, but on an H100 it runs at ~10 TFLOP/s, 38-83x slower than
    ``x @ nf4_dequantize(packed, quant_state).T`` for a 14336x4096 weight at M 512-8192
    (docs/nf4_lora.md). Use the dequantize + matmul form (what ``lora_linear`` does) for speed.

    >>> import torch, fastkern
    >>> from fastkern.experimental.nf4_matmul import nf4_matmul
    >>> w = torch.randn(8, 64)
    >>> packed, state = fastkern.ops.nf4_quantize(w)
    >>> x = torch.randn(3, 64)
    >>> y = nf4_matmul(x, packed, state)
    >>> torch.allclose(y, x @ fastkern.ops.nf4_dequantize(packed, state).T, atol=1e-4)
    True
    >>> nf4_matmul(y, packed, state, transpose=True).shape
    torch.Size([3, 64])
    """
    op = "fastkern.experimental.nf4_matmul"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    if not isinstance(transpose, bool):
        raise TypeError(f"{op}: `transpose` must be a bool, got {type(transpose).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{op}: `x` must have at least one dim (the reduction dim), got a 0-d tensor")
    # fp64 x: W's values in fp32 (exact products of code and scale), promoted by the reference.
    s = flatten_state(op, packed, quant_state, x.dtype if x.dtype in KERNEL_DTYPES else torch.float32)
    if len(s.shape) != 2:
        raise ValueError(f"{op}: `quant_state.shape` is {tuple(s.shape)}; nf4_matmul needs a 2-D weight [N, K]")
    n, k = s.shape
    if x.shape[-1] != (n if transpose else k):
        want = f"[..., {n}] (x @ W)" if transpose else f"[..., {k}] (x @ W.T)"
        raise ValueError(f"{op}: `x` has shape {tuple(x.shape)}; W [{n}, {k}] with transpose={transpose} needs "
                         f"{want}")
    if x.device != s.packed.device:
        raise ValueError(f"{op}: `x` is on {x.device} but `packed` is on {s.packed.device}")
    return _apply(x, s.packed, s.code, s.absmax, s.absmax2, s.code2, s.offset, s.blocksize, s.nested_blocksize,
                  n, k, transpose)
