"""Several LoRA linear layers on one input as one autograd node: q/k/v of an attention, gate/up of an MLP.

``lora_linear_group(x, projections)`` returns what one :func:`fastkern.ops.lora_linear` call per
projection returns, with the same kernels and the same products in the same order (forward: per
projection ``xs = s x A.T`` and the base GEMM; backward: per projection dA, dB and the dX terms), so
values agree with the separate calls up to the summation of dX. What it saves is host work, which is
what limits a LoRA or QLoRA step of a small model on a GPU (docs/e2e.md, "Where the time goes"): one
autograd node, one argument pass and one backward call for the group instead of one per projection,
and dX accumulated in place instead of a separate dX per projection that autograd then adds up (one
[M, K] buffer and one add kernel less per extra projection). For 16-bit weights the LoRA terms go
first, as one GEMM ``[s_0 dY_0 B_0 | s_1 dY_1 B_1 | ...] [A_0; A_1; ...]``, then ``dX += dY_i W_i``:
one bf16 rounding of dX per projection plus one, fewer than the separate calls' sum (tests/
test_accuracy_rule.py judges the result against a float64 run).

Eager only: under torch.compile, and while a caller asks for an unused output (ops/unused_output.py,
meant for one projection), the projections are plain lora_linear calls. Parameters are held by
reference with their version counters checked in backward, and activations are saved, exactly as
lora_linear does (its module docstring says why); a base weight that is not a parameter (or a view of
one) sends the group to separate calls, where it is saved.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.nn import Parameter
from torch._C import _are_functorch_transforms_active as _functorch_transforms_active
from torch._C._functorch import unwrap_if_dead as _unwrap_if_dead

from .lora_linear import (
    _PLAIN,
    _adapter_grads,
    _backward_impl,
    _forward_impl,
    _in_dtype,
    _modified_error,
    _parameter_or_view,
    _prepare,
    _reuse,
    _versions,
    lora_linear,
)
from .unused_output import request as _unused

# One projection: (weight, lora_A, lora_B, scaling, bias or None, quant_state or None), as lora_linear
# takes them.
Projection = tuple


def _held(t: Tensor) -> bool:
    """A parameter (or a view of one), held by reference rather than saved (lora_linear's rule)."""
    return t.__class__ is Parameter or (
        (t.__class__ is not Tensor or t._base is not None) and _parameter_or_view(t))


class LoRALinearGroupFunction(torch.autograd.Function):
    """forward(x [M, K], bases, *adapters) -> (y_0, y_1, ...); ``bases`` holds per projection
    (W, NF4 flat state, scaling), ``adapters`` per projection (lora_A, lora_B, bias)."""

    @staticmethod
    def forward(ctx, x, bases, *adapters):
        outs, saved, records = [], [x], []
        for i, (weight, quant, scaling) in enumerate(bases):
            lora_a, lora_b, bias = adapters[3 * i:3 * i + 3]
            y, xs = _forward_impl(x, weight, lora_a, lora_b, bias, *quant[:5], scaling, *quant[5:])
            kept = None
            if quant[0] is not None:
                last, _reuse.last = _reuse.last, None  # this call's W, kept for its backward (lora_linear)
                if last is not None and last[0] is x:
                    kept = last[1:]
            # _held, spelled out for the common classes (a Parameter; a plain tensor that is no view).
            held_a = lora_a.__class__ is Parameter or (
                (lora_a.__class__ is not Tensor or lora_a._base is not None) and _parameter_or_view(lora_a))
            held_b = lora_b.__class__ is Parameter or (
                (lora_b.__class__ is not Tensor or lora_b._base is not None) and _parameter_or_view(lora_b))
            saved += (xs, None if held_a else lora_a, None if held_b else lora_b)
            versions = ((weight._version, lora_a._version, lora_b._version) if quant[0] is None
                        else _versions(weight, lora_a, lora_b, quant[:5]))
            records.append([weight, quant, scaling, lora_a if held_a else None, lora_b if held_b else None, versions,
                            bias is not None and bias.requires_grad, kept])
            outs.append(y)
        ctx.save_for_backward(*saved)
        ctx.records = records
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        x = saved[0]
        needs = ctx.needs_input_grad
        grad_x = None
        result = [None, None]
        # Dense projections: dX = [g_0 | g_1 | ...] [A_0; A_1; ...] + sum_i dY_i W_i with g_i = s_i dY_i B_i,
        # the LoRA terms as one small GEMM and then each base term added in place: one rounding of dX
        # per projection plus one, fewer than separate calls summed by autograd. NF4 projections keep
        # lora_linear's own dX scheme (its [W | B] concatenation), accumulated in place.
        dense = needs[0] and all(record[1][0] is None for record in ctx.records)
        lora_terms, base_terms = [], []
        for i, record in enumerate(ctx.records):
            weight, quant, scaling, lora_a, lora_b, versions, bias_grad, kept = record
            record[7] = None  # a kept W is released with this backward
            if lora_a is None:
                lora_a = saved[1 + 3 * i + 1]
            if lora_b is None:
                lora_b = saved[1 + 3 * i + 2]
            now = ((weight._version, lora_a._version, lora_b._version) if quant[0] is None
                   else _versions(weight, lora_a, lora_b, quant[:5]))
            if now != versions:
                raise _modified_error(versions, now)
            need_a, need_b, need_bias = needs[2 + 3 * i], needs[3 + 3 * i], needs[4 + 3 * i] and bias_grad
            if dense:
                dy = grads[i].contiguous()
                # float32 adapters are used in x's dtype, as lora_linear uses them (its _in_dtype)
                a = lora_a if lora_a.dtype == x.dtype else _in_dtype(lora_a, x.dtype)
                b = lora_b if lora_b.dtype == x.dtype else _in_dtype(lora_b, x.dtype)
                g = torch.mm(dy, b)
                if scaling != 1.0:
                    g.mul_(scaling)
                lora_terms.append((g, a))
                base_terms.append((dy, weight))
                result += (*_adapter_grads(g, dy, x, saved[1 + 3 * i], need_a, need_b, lora_a.dtype, lora_b.dtype),
                           dy.sum(0) if need_bias else None)
                continue
            gx, ga, gb, gbias = _backward_impl(
                grads[i], x, saved[1 + 3 * i], weight, lora_a, lora_b, *quant[:5], scaling, *quant[5:],
                needs[0], need_a, need_b, need_bias, kept, grad_x)
            grad_x = gx
            result += (ga, gb, gbias)
        if dense:
            gs, As = zip(*lora_terms)
            grad_x = torch.mm(torch.cat(gs, 1), torch.cat(As, 0))
            for dy, weight in base_terms:
                grad_x.addmm_(dy, weight)
        result[0] = grad_x
        return tuple(result)


def lora_linear_group(x: Tensor, projections: Sequence[Projection]) -> tuple[Tensor, ...]:
    """``lora_linear(x, *p)`` for each projection p, as one autograd node (module docstring).

    Each projection is ``(weight, lora_A, lora_B, scaling, bias, quant_state)`` with the meaning and
    checks of :func:`fastkern.ops.lora_linear`'s arguments (bias and quant_state may be None); x is
    shared. Returns one output per projection, [..., N_i].

    >>> import torch, fastkern
    >>> from fastkern.ops.lora_linear_group import lora_linear_group
    >>> x = torch.randn(3, 16)
    >>> p = [(torch.randn(n, 16), torch.randn(4, 16), torch.randn(n, 4), 0.5, None, None) for n in (8, 4)]
    >>> q, k = lora_linear_group(x, p)
    >>> torch.allclose(k, fastkern.ops.lora_linear(x, *p[1][:4]), atol=1e-5)
    True
    """
    if not projections:
        raise ValueError("fastkern.ops.lora_linear_group: `projections` is empty")
    if _unused.pending or torch.compiler.is_compiling() or x.__class__ not in _PLAIN:
        return _separately(x, projections)
    # Loops rather than comprehensions and generators: this runs for every attention and MLP of every
    # layer, and each of those is a Python call of its own.
    bases, adapters, widths = [], [], []
    grad, held = False, True
    for w, a, b, s, bias, state in projections:
        weight, quant, n = _prepare(x, w, a, b, s, bias, state)
        bases.append((weight, quant, float(s)))
        adapters += (a, b, bias)
        widths.append(n)
        grad = grad or a.requires_grad or b.requires_grad or (bias is not None and bias.requires_grad)
        held = held and (weight.__class__ is Parameter or _held(weight))
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    if torch.is_grad_enabled() and (grad or x.requires_grad):
        if not held:  # a W that must be saved: lora_linear saves it
            return _separately(x, projections)
        if _functorch_transforms_active():
            outs = LoRALinearGroupFunction.apply(x2d, tuple(bases), *adapters)
        else:  # autograd's C apply, as fastkern's other eager ops call it (ops/_autograd.py)
            args = [_unwrap_if_dead(x2d), tuple(bases)]
            for t in adapters:
                args.append(t if t is None else _unwrap_if_dead(t))
            outs = _APPLY(*args)
    else:  # nothing to differentiate (a checkpoint's first forward): the implementations directly
        outs = []
        i = 0
        for weight, quant, scaling in bases:
            outs.append(_forward_impl(x2d, weight, adapters[i], adapters[i + 1], adapters[i + 2], *quant[:5], scaling,
                                      *quant[5:])[0])
            i += 3
            if quant[0] is not None:
                _reuse.last = None
    lead = x.shape[:-1]
    views = []
    for out, n in zip(outs, widths):
        views.append(out.view(*lead, n))
    return tuple(views)


def _separately(x: Tensor, projections: Sequence[Projection]) -> tuple[Tensor, ...]:
    outs = []
    for w, a, b, s, bias, state in projections:
        outs.append(lora_linear(x, w, a, b, s, bias=bias, quant_state=state))
    return tuple(outs)


# Autograd's C apply bound to the Function: what Function.apply ends in outside functorch transforms,
# after unwrapping tensors left over from exited transforms, without its Python argument binding.
_APPLY = super(torch.autograd.Function, LoRALinearGroupFunction).apply
