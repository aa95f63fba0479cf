"""LoRA linear layer: y = x @ W.T + bias + scaling * (x @ A.T) @ B.T, W dense 16-bit or NF4.

Design (docs/nf4_lora.md has the byte counts and numbers): the large products run on cuBLAS, and
no call copies or concatenates a dense W. With xs = scaling * (x @ A.T) ([M, r], saved for backward):

* dense base: ``y = bias + xs @ B.T`` (the rank-r product writes the output), then the base GEMM
  accumulates onto it (cuBLAS beta = 1): the large term is rounded once, the extra traffic is one
  [M, N] write + read. Backward likewise: ``dX = (s dY B) @ A``, then ``dX += dY @ W``.
* NF4 base: W must be materialized in 16 bits anyway (a transient buffer, recomputed in backward so
  QLoRA's memory stays 4-bit between forward and backward). When that saves bytes the dequantization
  writes into an [N, K + r] buffer whose last r columns hold B, and the LoRA term rides in the
  reduction dimension of the same GEMM: ``y = [x | xs] @ [W | B]^T`` (2K <= 3N) and
  ``[dY W | dY B] = dY @ [W | B]`` (N > 2K; dX is then copied out contiguous, see
  ``_concat_backward``); otherwise it takes the dense scheme on the dequantized W.

Tiers: the implementations ``_forward_impl`` / ``_backward_impl``; two custom ops
(``fastkern::lora_linear_forward`` / ``_backward``) with fake implementations and autograd registered
on the forward, which is what torch.compile sees; a plain autograd.Function that eager calls take
(the custom-op autograd wrapper costs hundreds of microseconds of host time per step, see
docs/glu.md); and the public :func:`lora_linear`.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import KERNEL_DTYPES, FLOAT_DTYPES, check_tensor
from .nf4 import FlatNF4, dequantize_into, flatten_state

# (code, absmax, absmax2, code2, offset, blocksize, nested_blocksize) of an NF4 base, or None.
Quant = tuple | None


def _concat_path(k: int, n: int, nf4: bool) -> bool:
    # Forward: folding the LoRA term into the NF4 GEMM costs the [x | xs] copy (~4MK bytes); the
    # beta = 1 scheme costs ~4MN (one more [M, N] write + read).
    return nf4 and 2 * k <= 3 * n


def _concat_backward(k: int, n: int, nf4: bool) -> bool:
    # Backward: [dY W | dY B] = dY @ [W | B] leaves dX as the first K columns of an [M, K + r] result,
    # a view with row stride K + r. dX must leave this op contiguous: torch 2.11's cuDNN attention
    # backward reads a strided grad_out as if it were contiguous (wrong q/k/v gradients, ~140% error,
    # found through o_proj: bench/probe_sdpa_strided_grad.py), and other consumers may assume it too.
    # Copying dX out costs ~4MK bytes; the beta = 1 scheme instead reads dY a second time for dY @ B
    # (2MN). So the concatenated GEMM pays only when N > 2K (e.g. 4096 -> 14336, gate/up of Llama).
    return nf4 and n > 2 * k


def _dequantized(weight: Tensor, quant: Quant, lora_b: Tensor, k: int, concat: bool) -> Tensor:
    """W in 16 bits: [N, K], or [W | B] as one [N, K + r] buffer when ``concat``."""
    n, r = lora_b.shape
    buf = torch.empty((n, k + r if concat else k), dtype=lora_b.dtype, device=lora_b.device)
    dequantize_into(buf[:, :k] if concat else buf, weight, *quant)
    if concat:
        buf[:, k:].copy_(lora_b)
    return buf


def _scaled(t: Tensor, scaling: float) -> Tensor:
    # scaling = lora_alpha / r is often exactly 1 (PEFT's defaults): skip a kernel launch then.
    return t if scaling == 1.0 else t.mul_(scaling)


def _forward_impl(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None, quant: Quant,
                  scaling: float) -> tuple[Tensor, Tensor]:
    """x: [M, K]. Returns (y [M, N], xs = scaling * x @ A.T [M, r]); xs is saved for backward."""
    k = x.shape[1]
    xs = _scaled(F.linear(x, lora_a), scaling)
    concat = _concat_path(k, lora_b.shape[0], quant is not None)
    w = weight if quant is None else _dequantized(weight, quant, lora_b, k, concat)
    if concat:  # w is [W | B]
        x_cat = torch.cat([x, xs], dim=1)
        return (torch.mm(x_cat, w.t()) if bias is None else torch.addmm(bias, x_cat, w.t())), xs
    return F.linear(xs, lora_b, bias).addmm_(x, w.t()), xs


def _backward_impl(grad_out: Tensor, x: Tensor, xs: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                   quant: Quant, scaling: float, need_x: bool, need_a: bool, need_b: bool, need_bias: bool):
    """(dX [M, K], dA [r, K], dB [N, r], dbias [N]); a gradient not asked for is None."""
    k = x.shape[1]
    dy = grad_out.contiguous()
    grad_x = g = None
    if need_x:
        concat = _concat_backward(k, lora_b.shape[0], quant is not None)
        w = weight if quant is None else _dequantized(weight, quant, lora_b, k, concat)
        if concat:
            both = torch.mm(dy, w)  # w is [W | B]: [dY W | dY B]
            g = both[:, k:] * scaling  # s dY B, a new [M, r] tensor
            # Out of place: dX is a new contiguous [M, K] tensor (see _concat_backward).
            grad_x = torch.addmm(both[:, :k], g, lora_a)
        else:
            g = _scaled(torch.mm(dy, lora_b), scaling)
            grad_x = torch.mm(g, lora_a).addmm_(dy, w)
    elif need_a:  # no dX wanted (e.g. the first layer's input): W is not needed at all
        g = _scaled(torch.mm(dy, lora_b), scaling)
    grad_a = torch.mm(g.t(), x) if need_a else None
    grad_b = torch.mm(dy.t(), xs) if need_b else None
    grad_bias = dy.sum(0) if need_bias else None
    return grad_x, grad_a, grad_b, grad_bias


def _unpack(code, absmax, absmax2, code2, offset, blocksize, nested_blocksize) -> Quant:
    return None if code is None else (code, absmax, absmax2, code2, offset, blocksize, nested_blocksize)


@torch.library.custom_op("fastkern::lora_linear_forward", mutates_args=())
def lora_linear_forward_op(
    x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None, code: Tensor | None,
    absmax: Tensor | None, absmax2: Tensor | None, code2: Tensor | None, offset: Tensor | None, scaling: float,
    blocksize: int, nested_blocksize: int,
) -> tuple[Tensor, Tensor]:
    quant = _unpack(code, absmax, absmax2, code2, offset, blocksize, nested_blocksize)
    return _forward_impl(x, weight, lora_a, lora_b, bias, quant, scaling)


@lora_linear_forward_op.register_fake
def _(x, weight, lora_a, lora_b, bias, code, absmax, absmax2, code2, offset, scaling, blocksize, nested_blocksize):
    return x.new_empty((x.shape[0], lora_b.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("fastkern::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    grad_out: Tensor, x: Tensor, xs: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
    code: Tensor | None, absmax: Tensor | None, absmax2: Tensor | None, code2: Tensor | None,
    offset: Tensor | None, scaling: float, blocksize: int, nested_blocksize: int, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dX, dA, dB, dbias); dbias is zeros unless ``bias_grad`` (a custom op cannot return None)."""
    quant = _unpack(code, absmax, absmax2, code2, offset, blocksize, nested_blocksize)
    grad_x, grad_a, grad_b, grad_bias = _backward_impl(grad_out, x, xs, weight, lora_a, lora_b, quant, scaling,
                                                       True, True, True, bias_grad)
    return grad_x, grad_a, grad_b, grad_bias if bias_grad else grad_out.new_zeros(grad_out.shape[1])


@lora_linear_backward_op.register_fake
def _(grad_out, x, xs, weight, lora_a, lora_b, code, absmax, absmax2, code2, offset, scaling, blocksize,
      nested_blocksize, bias_grad):
    return (x.new_empty(x.shape), lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape),
            grad_out.new_empty((grad_out.shape[1],)))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, code, absmax, absmax2, code2, offset, scaling, blocksize, nested = inputs
    ctx.save_for_backward(x, output[1], weight, lora_a, lora_b, code, absmax, absmax2, code2, offset)
    ctx.scaling, ctx.blocksize, ctx.nested_blocksize = scaling, blocksize, nested
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward(ctx, grad_out, grad_xs):
    x, xs, weight, lora_a, lora_b, code, absmax, absmax2, code2, offset = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x, grad_a, grad_b, grad_bias = lora_linear_backward_op(
        grad_out, x, xs, weight, lora_a, lora_b, code, absmax, absmax2, code2, offset,
        ctx.scaling, ctx.blocksize, ctx.nested_blocksize, ctx.bias_grad and needs[4],
    )
    return (grad_x if needs[0] else None, None, grad_a if needs[2] else None, grad_b if needs[3] else None,
            grad_bias if ctx.bias_grad and needs[4] else None, None, None, None, None, None, None, None, None)


lora_linear_forward_op.register_autograd(_backward, setup_context=_setup_context)


class LoRALinearFunction(torch.autograd.Function):
    """Eager-mode autograd for the same math, calling the implementations directly."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, quant, scaling):
        out, xs = _forward_impl(x, weight, lora_a, lora_b, bias, quant, scaling)
        ctx.save_for_backward(x, xs, weight, lora_a, lora_b)
        ctx.quant, ctx.scaling = quant, scaling  # frozen quant-state tensors, never outputs
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, xs, weight, lora_a, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, grad_a, grad_b, grad_bias = _backward_impl(
            grad_out, x, xs, weight, lora_a, lora_b, ctx.quant, ctx.scaling, needs[0], needs[2], needs[3], needs[4])
        return grad_x, None, grad_a, grad_b, grad_bias, None, None


def _check_operand(op: str, name: str, t: Tensor, x: Tensor) -> None:
    check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `x` has {x.dtype}; cast it")
    if t.device != x.device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `x` is on {x.device}")


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, *,
                bias: Tensor | None = None, quant_state=None) -> Tensor:
    """``x @ W.T + bias + scaling * (x @ lora_A.T) @ lora_B.T``, without separate passes for the LoRA term.

    x: [..., K] (fp16/bf16/fp32). weight: dense [N, K] in x's dtype, or the NF4-packed bytes of a
    bitsandbytes ``Params4bit`` (any quant_storage) with ``quant_state`` (bitsandbytes ``QuantState``
    or ``NF4State``). lora_A: [r, K], lora_B: [N, r], bias: [N] or None, all in x's dtype.
    Differentiable in x, lora_A, lora_B and bias; the base weight is frozen (a dense weight that
    requires grad is rejected rather than silently left without a gradient).

    >>> import torch, fastkern
    >>> x, w = torch.randn(3, 16), torch.randn(8, 16)
    >>> a, b = torch.randn(4, 16), torch.randn(8, 4)
    >>> y = fastkern.ops.lora_linear(x, w, a, b, 0.5)
    >>> torch.allclose(y, x @ w.T + 0.5 * (x @ a.T) @ b.T, atol=1e-4)
    True
    """
    op = "fastkern.ops.lora_linear"
    check_tensor(op, "x", x, dtypes=KERNEL_DTYPES)
    if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool):
        raise TypeError(f"{op}: `scaling` must be a Python number, got {type(scaling).__name__}")
    k = x.shape[-1]
    _check_operand(op, "lora_A", lora_A, x)
    _check_operand(op, "lora_B", lora_B, x)
    if bias is not None:
        _check_operand(op, "bias", bias, x)
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"{op}: `lora_A` must be [r, {k}] for x [..., {k}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    nf4: FlatNF4 | None = None
    if quant_state is None:
        _check_operand(op, "weight", weight, x)
        if weight.dim() != 2 or weight.shape[1] != k:
            raise ValueError(f"{op}: `weight` must be [N, {k}] for x [..., {k}], got {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: `weight` requires grad; lora_linear treats the base weight as frozen")
        n = weight.shape[0]
    else:
        nf4 = flatten_state(op, weight, quant_state, dtype=x.dtype)
        n, k_w = nf4.rows_cols
        if len(nf4.shape) != 2 or k_w != k:
            raise ValueError(f"{op}: `quant_state.shape` {tuple(nf4.shape)} is not [N, {k}] for x [..., {k}]")
        if weight.device != x.device:
            raise ValueError(f"{op}: `weight` is on {weight.device} but `x` is on {x.device}")
    if lora_B.dim() != 2 or lora_B.shape[0] != n or lora_B.shape[1] != r:
        raise ValueError(f"{op}: `lora_B` must be [{n}, {r}], got {tuple(lora_B.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"{op}: `bias` must be [{n}], got {tuple(bias.shape)}")
    x2d = x.reshape(-1, k)
    scaling = float(scaling)
    if torch.compiler.is_compiling():
        if nf4 is None:
            out, _ = lora_linear_forward_op(x2d, weight, lora_A, lora_B, bias, None, None, None, None, None,
                                            scaling, 0, 0)
        else:
            out, _ = lora_linear_forward_op(x2d, nf4.packed, lora_A, lora_B, bias, nf4.code, nf4.absmax, nf4.absmax2,
                                            nf4.code2, nf4.offset, scaling, nf4.blocksize, nf4.nested_blocksize)
    else:
        quant = None if nf4 is None else nf4[1:8]
        w = weight if nf4 is None else nf4.packed
        if torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            out = LoRALinearFunction.apply(x2d, w, lora_A, lora_B, bias, quant, scaling)
        else:  # nothing to differentiate: skip autograd.Function's bookkeeping (~10-20 us of host time)
            out = _forward_impl(x2d, w, lora_A, lora_B, bias, quant, scaling)[0]
    return out.view(*x.shape[:-1], n)
