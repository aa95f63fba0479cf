"""LoRA linear layer: y = x @ W.T + bias + scaling * (x @ A.T) @ B.T, W dense 16-bit or NF4.

Design (docs/nf4_lora.md has the numbers): the large products run on cuBLAS; the LoRA term rides in
the SAME GEMM as the base product by concatenating along the reduction dimension,

    y = [x | x A^T] @ [W | s B]^T          (K + r columns instead of K)
    [dY W | s dY B] = dY @ [W | s B]       (backward: dX's base part and the LoRA factor in one GEMM)

so no separate pass over the [M, N] output or the [M, N] gradient exists for the LoRA term. For an
NF4 base the concatenated [N, K + r] operand is where the Triton dequantization kernel writes anyway
(a transient 16-bit buffer, recomputed in backward instead of saved: QLoRA's memory stays 4-bit
between forward and backward). For a dense base the concatenation costs a copy of W, which is
cheaper than a pass over [M, N] only when M >= K; below that the LoRA product is accumulated onto
the output by cuBLAS (beta = 1) instead.

Tiers: two custom ops (``fastkern::lora_linear_forward`` / ``_backward``) with fake implementations,
autograd registered on the forward, and the public :func:`lora_linear`.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ._common import KERNEL_DTYPES, FLOAT_DTYPES, check_tensor
from .nf4 import dequantize_into, flatten_state


def _concat_path(m: int, k: int, nf4: bool) -> bool:
    return nf4 or m >= k


def _base_with_lora(weight, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize, lora_b, scaling,
                    k: int) -> Tensor:
    """[W | scaling * B] as one [N, K + r] buffer (W dequantized by the Triton kernel when NF4)."""
    n, r = lora_b.shape
    buf = torch.empty((n, k + r), dtype=lora_b.dtype, device=lora_b.device)
    if code is None:
        buf[:, :k].copy_(weight)
    else:
        dequantize_into(buf[:, :k], weight, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize)
    torch.mul(lora_b, scaling, out=buf[:, k:])
    return buf


@torch.library.custom_op("fastkern::lora_linear_forward", mutates_args=())
def lora_linear_forward_op(
    x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None, code: Tensor | None,
    absmax: Tensor | None, absmax2: Tensor | None, code2: Tensor | None, offset: Tensor | None, scaling: float,
    blocksize: int, nested_blocksize: int,
) -> tuple[Tensor, Tensor]:
    """x: [M, K]. Returns (y [M, N], x @ A.T [M, r]); the second is saved for backward."""
    m, k = x.shape
    xa = x @ lora_a.T
    if _concat_path(m, k, code is not None):
        w_cat = _base_with_lora(weight, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize,
                                lora_b, scaling, k)
        x_cat = torch.cat([x, xa], dim=1)
        out = x_cat @ w_cat.T if bias is None else torch.addmm(bias, x_cat, w_cat.T)
    else:
        out = x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)
        out.addmm_(xa, lora_b.T, alpha=scaling)
    return out, xa


@lora_linear_forward_op.register_fake
def _(x, weight, lora_a, lora_b, bias, code, absmax, absmax2, code2, offset, scaling, blocksize, nested_blocksize):
    return x.new_empty((x.shape[0], lora_b.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


def _grad_x_buffer(x: Tensor, r: int, concat: bool) -> Tensor:
    # On the concat path dX is the first K columns of the [M, K + r] GEMM result (row stride K + r).
    m, k = x.shape
    return x.new_empty((m, k + r))[:, :k] if concat else x.new_empty((m, k))


@torch.library.custom_op("fastkern::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    grad_out: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
    code: Tensor | None, absmax: Tensor | None, absmax2: Tensor | None, code2: Tensor | None,
    offset: Tensor | None, scaling: float, blocksize: int, nested_blocksize: int, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dX [M, K], dA [r, K], dB [N, r], dbias [N]; zeros unless ``bias_grad``: a pass over dY)."""
    m, k = x.shape
    r = lora_a.shape[0]
    dy = grad_out.contiguous()
    if _concat_path(m, k, code is not None):
        w_cat = _base_with_lora(weight, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize,
                                lora_b, scaling, k)
        both = dy @ w_cat  # [dY W | s dY B]
        g = both[:, k:].clone()  # s * dY @ B, [M, r]; a copy so the in-place update below reads no alias
        grad_x = both[:, :k]
    else:
        g = torch.mm(dy, lora_b).mul_(scaling)
        grad_x = dy @ weight
    grad_x.addmm_(g, lora_a)
    grad_a = g.T @ x
    grad_b = dy.T @ (xa * scaling)
    grad_bias = dy.sum(0) if bias_grad else dy.new_zeros(dy.shape[1])
    return grad_x, grad_a, grad_b, grad_bias


@lora_linear_backward_op.register_fake
def _(grad_out, x, xa, weight, lora_a, lora_b, code, absmax, absmax2, code2, offset, scaling, blocksize,
      nested_blocksize, bias_grad):
    concat = _concat_path(x.shape[0], x.shape[1], code is not None)
    return (_grad_x_buffer(x, lora_a.shape[0], concat), lora_a.new_empty(lora_a.shape),
            lora_b.new_empty(lora_b.shape), grad_out.new_empty((grad_out.shape[1],)))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, code, absmax, absmax2, code2, offset, scaling, blocksize, nested = inputs
    ctx.save_for_backward(x, output[1], weight, lora_a, lora_b, code, absmax, absmax2, code2, offset)
    ctx.scaling, ctx.blocksize, ctx.nested_blocksize = scaling, blocksize, nested
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward(ctx, grad_out, grad_xa):
    x, xa, weight, lora_a, lora_b, code, absmax, absmax2, code2, offset = ctx.saved_tensors
    grad_x, grad_a, grad_b, grad_bias = lora_linear_backward_op(
        grad_out, x, xa, weight, lora_a, lora_b, code, absmax, absmax2, code2, offset,
        ctx.scaling, ctx.blocksize, ctx.nested_blocksize, ctx.bias_grad and ctx.needs_input_grad[4],
    )
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, None, grad_a if needs[2] else None, grad_b if needs[3] else None,
            grad_bias if ctx.bias_grad and needs[4] else None, None, None, None, None, None, None, None, None)


lora_linear_forward_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, *,
                bias: Tensor | None = None, quant_state=None) -> Tensor:
    """``x @ W.T + bias + scaling * (x @ lora_A.T) @ lora_B.T``, the LoRA term inside the base GEMM.

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
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is None:
            continue
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `x` has {x.dtype}; cast it")
        if t.device != x.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `x` is on {x.device}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"{op}: `lora_A` must be [r, {k}] for x [..., {k}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if quant_state is None:
        check_tensor(op, "weight", weight, dtypes=FLOAT_DTYPES)
        if weight.dtype != x.dtype:
            raise TypeError(f"{op}: `weight` has dtype {weight.dtype} but `x` has {x.dtype}; cast it")
        if weight.dim() != 2 or weight.shape[1] != k:
            raise ValueError(f"{op}: `weight` must be [N, {k}] for x [..., {k}], got {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{op}: `weight` requires grad; lora_linear treats the base weight as frozen")
        n = weight.shape[0]
        nf4 = None
    else:
        nf4 = flatten_state(op, weight, quant_state, dtype=x.dtype)
        n, k_w = nf4.rows_cols
        if len(nf4.shape) != 2 or k_w != k:
            raise ValueError(f"{op}: `quant_state.shape` {tuple(nf4.shape)} is not [N, {k}] for x [..., {k}]")
        if weight.device != x.device:
            raise ValueError(f"{op}: `weight` is on {weight.device} but `x` is on {x.device}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (n, r):
        raise ValueError(f"{op}: `lora_B` must be [{n}, {r}], got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: `bias` must be [{n}], got {tuple(bias.shape)}")
    x2d = x.reshape(-1, k)
    if nf4 is None:
        out, _ = lora_linear_forward_op(x2d, weight, lora_A, lora_B, bias, None, None, None, None, None,
                                        float(scaling), 0, 0)
    else:
        out, _ = lora_linear_forward_op(x2d, nf4.packed, lora_A, lora_B, bias, nf4.code, nf4.absmax, nf4.absmax2,
                                        nf4.code2, nf4.offset, float(scaling), nf4.blocksize, nf4.nested_blocksize)
    return out.view(*x.shape[:-1], n)
