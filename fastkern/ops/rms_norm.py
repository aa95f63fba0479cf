"""RMSNorm over the last dim, in transformers' llama and gemma forms, saving only x and rstd.

Tiers: the Triton kernels in fastkern/kernels/rms_norm.py, launched below; two custom ops
(``fastkern::rms_norm_forward`` returns (y, rstd), ``fastkern::rms_norm_backward`` returns (dx, dw))
with fake implementations; one autograd definition that ops/_autograd.py registers on the forward op
(what torch.compile sees) and turns into a plain autograd.Function for eager calls (lighter on the
host); and the public :func:`rms_norm`.

Why: transformers' RMSNorm saves ``x.float()`` for its backward, an fp32 copy of every normed
tensor (four per Qwen3 layer: 180 MiB per layer at 9216 tokens of Qwen3-0.6B, the largest item a
checkpointed layer recomputes; docs/trainers.md). This op saves x as it is (already alive: it is
the layer input or a projection output) plus 4 bytes of rstd per row.
"""

from __future__ import annotations

import functools
import numbers

import torch
from torch import Tensor

from ..reference.rms_norm import rms_norm_backward_reference, rms_norm_reference
from ._autograd import AutogradOp, backward_dispatch
from ._common import FLOAT_DTYPES, as_rows, check_tensor, device_guard, needs_int64, op_path, output_buffer

_OP = "fastkern.ops.rms_norm"
# Programs per backward launch when a weight gradient is reduced across rows: enough to fill an H100
# (132 SMs) a few times over; each writes one fp32 partial row of the weight gradient.
_WEIGHT_GRAD_PROGRAMS = 512
# How the backward splits rows over programs when it reduces a weight gradient: (most programs, whole
# tiles per program). On the GPU each program takes whole BLOCK_M-row tiles; under the interpreter the
# rows are split anywhere over at most 4 programs (the kernel masks each program's last tile at its own
# range's end), so the CPU tests see ragged splits; they also switch this to whole tiles.
_GPU_SPLIT = (_WEIGHT_GRAD_PROGRAMS, True)
_INTERPRETER_SPLIT = (4, False)


# Elements per program for narrow rows: rows narrower than this are stacked BLOCK_M to a tile.
_TILE_ELEMENTS = 2048


@functools.lru_cache(maxsize=64)
def launch_config(n_cols: int, tile_elements: int = _TILE_ELEMENTS) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): the whole row in one block of BLOCK_N columns, and BLOCK_M rows
    per tile so that a tile holds about ``tile_elements`` (rows of the model's hidden size: 1)."""
    block = max(16, 1 << (max(n_cols, 1) - 1).bit_length())
    block_m = max(1, tile_elements // block)
    elements = block * block_m
    warps = 16 if elements >= 16384 else 8 if elements >= 4096 else 4 if elements >= 1024 else 2
    return block_m, block, warps


def _dense_weight(weight: Tensor) -> Tensor:
    # The kernels index the [n_cols] weight with unit stride; a strided one (a view of a larger
    # parameter) is copied, as small as one row of x.
    return weight if weight.stride(0) == 1 else weight.contiguous()


def _forward_impl(x: Tensor, weight: Tensor, eps: float, weight_offset: float, cast_before_weight: bool):
    path = op_path(x)
    if path == "reference" or x.numel() == 0:
        y, rstd = rms_norm_reference(x, weight, eps, weight_offset, cast_before_weight)
        return y.contiguous(), rstd.float()
    from ..kernels.rms_norm import rms_norm_forward_kernel

    weight = _dense_weight(weight)
    rows_view = as_rows(x)
    n_rows, n_cols = rows_view.shape
    y = output_buffer(x.shape, x.dtype, x.device)
    rstd = output_buffer(n_rows, torch.float32, x.device)
    block_m, block, warps = launch_config(n_cols, _TILE_ELEMENTS)
    with device_guard(x):
        rms_norm_forward_kernel[(-(-n_rows // block_m),)](
            rows_view, weight, y, rstd, n_rows, n_cols, rows_view.stride(0), rows_view.stride(1), n_cols,
            float(eps), float(weight_offset), CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_M=block_m, BLOCK_N=block,
            INT64_OFFSETS=needs_int64(rows_view, y, slack=block * block_m),
            ROUND_BF16=path == "interpreter" and x.dtype == torch.bfloat16, num_warps=warps,
        )
    return y, rstd


def _backward_impl(grad_out: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, weight_offset: float,
                   cast_before_weight: bool, need_weight_grad: bool):
    path = op_path(x)
    if path == "reference" or x.numel() == 0:
        dx, dw = rms_norm_backward_reference(grad_out, x, weight, rstd, weight_offset, cast_before_weight,
                                             need_weight_grad)
        if need_weight_grad and x.numel() == 0:
            dw = torch.zeros_like(weight)
        return dx.contiguous(), dw
    from ..kernels.rms_norm import rms_norm_backward_kernel

    weight = _dense_weight(weight)
    x_rows, dy_rows = as_rows(x), as_rows(grad_out)
    n_rows, n_cols = x_rows.shape
    dx = output_buffer(x.shape, x.dtype, x.device)
    block_m, block, warps = launch_config(n_cols, _TILE_ELEMENTS)
    tiles = -(-n_rows // block_m)
    if need_weight_grad:
        max_programs, whole_tiles = _GPU_SPLIT if path == "triton" else _INTERPRETER_SPLIT
        if whole_tiles:
            rows_per_program = -(-tiles // min(tiles, max_programs)) * block_m
        else:
            rows_per_program = -(-n_rows // min(n_rows, max_programs))
        programs = -(-n_rows // rows_per_program)
        partial = output_buffer((programs, n_cols), torch.float32, x.device)
    else:
        programs, rows_per_program, partial = tiles, block_m, rstd  # the kernel never touches partial then
    with device_guard(x):
        rms_norm_backward_kernel[(programs,)](
            dy_rows, x_rows, weight, rstd, dx, partial, n_rows, n_cols, rows_per_program,
            dy_rows.stride(0), dy_rows.stride(1), x_rows.stride(0), x_rows.stride(1), n_cols, float(weight_offset),
            CAST_BEFORE_WEIGHT=cast_before_weight, HAS_WEIGHT_GRAD=need_weight_grad, BLOCK_M=block_m,
            BLOCK_N=block, INT64_OFFSETS=needs_int64(x_rows, dy_rows, dx, slack=block * block_m),
            ROUND_BF16=path == "interpreter" and x.dtype == torch.bfloat16, num_warps=warps,
        )
    dw = partial.sum(0).to(weight.dtype) if need_weight_grad else None
    return dx, dw


@torch.library.custom_op("fastkern::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, weight_offset: float,
                         cast_before_weight: bool, need_weight_grad: bool) -> tuple[Tensor, Tensor]:
    dx, dw = _backward_impl(grad_out, x, weight, rstd, weight_offset, cast_before_weight, need_weight_grad)
    return dx, (dw if dw is not None else weight.new_zeros(weight.shape))


@rms_norm_backward_op.register_fake
def _(grad_out, x, weight, rstd, weight_offset, cast_before_weight, need_weight_grad):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


_rms_norm_backward = backward_dispatch(rms_norm_backward_op, _backward_impl)


def _rms_norm_forward(x: Tensor, weight: Tensor, eps: float, weight_offset: float,
                      cast_before_weight: bool) -> tuple[Tensor, Tensor]:
    return _forward_impl(x, weight, eps, weight_offset, cast_before_weight)


def _fake_forward(x, weight, eps, weight_offset, cast_before_weight):
    rows = x.shape[:-1].numel()  # one rstd per row, also when the rows are 0 wide
    return x.new_empty(x.shape), x.new_empty((rows,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, eps, weight_offset, cast_before_weight = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.opts = (weight_offset, cast_before_weight)


def _backward(ctx, grad_y):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward(grad_y, x, weight, rstd, *ctx.opts, ctx.needs_input_grad[1])
    return (dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, None, None, None)


# One autograd definition (ops/_autograd.py): the custom op fastkern::rms_norm_forward returns (y, rstd)
# for torch.compile, rstd marked non-differentiable; the eager Function returns y.
_RMS_NORM = AutogradOp("rms_norm_forward", _rms_norm_forward, fake=_fake_forward, setup_context=_setup_context,
                       backward=_backward, aux_outputs=1)
rms_norm_forward_op = _RMS_NORM.op
RMSNormFunction = _RMS_NORM.function


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, weight_offset: float = 0.0,
             cast_before_weight: bool = True) -> Tensor:
    """RMSNorm of x over its last dim, as transformers' model families compute it; returns x's dtype.

    ``cast_before_weight=True`` (default, weight_offset 0) is LlamaRMSNorm (also Mistral, Qwen2/3,
    Phi3): ``weight * (x.float() * rstd).to(x.dtype)``. ``cast_before_weight=False, weight_offset=1.0``
    is GemmaRMSNorm: ``(x.float() * rstd * (1 + weight.float())).to(x.dtype)``. rstd = 1 /
    sqrt(mean(x^2) + eps), fp32. x: any leading shape and strides, fp16/bf16/fp32 (fp64 runs the
    reference); weight: [x.shape[-1]] on x's device, any float dtype. Differentiable in x and weight.

    Backward saves x itself and one fp32 rstd per row, not an fp32 copy of x as transformers' module
    does (docs/trainers.md has what that saves per layer).

    >>> import torch, fastkern
    >>> x, w = torch.randn(3, 8), torch.rand(8)
    >>> ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    >>> torch.allclose(fastkern.ops.rms_norm(x, w), ref, atol=1e-6)
    True
    """
    check_tensor(_OP, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "weight", weight, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{_OP}: `x` must have at least one dim (normalized over the last); got a scalar")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{_OP}: `weight` must have shape [{x.shape[-1]}] (x's last dim); got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{_OP}: `weight` is on {weight.device} but `x` is on {x.device}")
    for name, value in (("eps", eps), ("weight_offset", weight_offset)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{_OP}: `{name}` must be a real number, got {type(value).__name__}")
    if eps < 0:
        raise ValueError(f"{_OP}: `eps` must be >= 0, got {eps}")
    args = (x, weight, float(eps), float(weight_offset), bool(cast_before_weight))
    return _RMS_NORM(*args)
