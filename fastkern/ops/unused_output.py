"""Projections whose output values nobody reads: the autograd node of ``x @ W.T + b`` without the product.

A reentrant checkpoint reruns a decoder layer in backward only to rebuild its autograd graph; the
rerun's output is the root that backward starts from, and its values are never read. In a layer that
ends ``residual + mlp(x)`` (Llama, Mistral, Qwen), the last op before that add is the MLP's down
projection, whose backward needs its input and weight but not its output (d input = dY W,
dW = dY^T input, d bias = sum dY), and an add's backward needs no values either. So the rerun can
skip the down projection's GEMM, the largest single GEMM of the layer (2 * tokens * H * I FLOPs; torch's
non-reentrant checkpoint skips it too, by stopping the recomputation once the last tensor backward
needs has been saved). fastkern/patching/rerun_tail.py decides when a rerun may skip it (it checks
the layer's graph); this module provides the two pieces that skip it:

* :func:`linear_output_unused`: ``F.linear(x, weight, bias)``'s gradients, with an uninitialized
  output (poisoned with NaN under ``set_output_poisoning``, so a test sees any read of it);
* :func:`output_unused`: a context under which the next :func:`fastkern.ops.lora_linear` call with
  gradients skips its base product the same way (a patched PEFT LoRA layer is called as a module, so
  the request travels beside the call rather than as an argument).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

from ._common import output_buffer


class _Request(threading.local):
    pending = False  # set by output_unused(); the next lora_linear call with gradients takes it
    taken = False


request = _Request()


@contextlib.contextmanager
def output_unused():
    """The next ``lora_linear`` call (with gradients, eager) inside this context returns an uninitialized
    output with correct gradients; :func:`output_unused_taken` says afterwards whether one did."""
    previous = request.pending, request.taken
    request.pending, request.taken = True, False
    try:
        yield
    finally:
        request.pending, request.taken = previous


def take_output_unused() -> bool:
    """Consume the request of the enclosing :func:`output_unused` (lora_linear reads ``request.pending``
    inline and calls this only when it is set)."""
    if request.pending:
        request.pending, request.taken = False, True
        return True
    return False


def output_unused_taken() -> bool:
    return request.taken


class LinearOutputUnused(torch.autograd.Function):
    """y = x @ W.T + b as an autograd node whose forward leaves y uninitialized."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return output_buffer((*x.shape[:-1], weight.shape[0]), x.dtype, x.device)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dy = grad_out.reshape(-1, weight.shape[0])
        grad_x = torch.mm(dy, weight).view(x.shape) if need_x else None
        grad_w = torch.mm(dy.t(), x.reshape(-1, x.shape[-1])) if need_w else None
        grad_b = dy.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def linear_output_unused(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a caller that only backpropagates through the result: the same
    gradients for x, weight and bias, the output's values uninitialized. x [..., K], weight [N, K],
    bias [N] or None, one dtype and device (no autocast casts: the caller checks there are none)."""
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fastkern.ops.linear_output_unused: weight {tuple(weight.shape)} does not take "
                         f"x [..., {x.shape[-1]}]")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError("fastkern.ops.linear_output_unused: x, weight and bias must share one dtype")
    return LinearOutputUnused.apply(x, weight, bias)
