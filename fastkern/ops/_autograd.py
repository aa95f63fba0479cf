"""One autograd definition per op, two ways to run it: a custom op for torch.compile, an eager Function.

An op is defined once, as (forward, fake, setup_context, backward):

* ``forward(*args)``: the implementation (dispatching to kernel / interpreter / reference itself),
  annotated so that ``torch.library.custom_op`` can infer the op's schema from it;
* ``fake(*args)``: output shapes and dtypes for torch.compile;
* ``setup_context(ctx, inputs, output)``: what backward needs (``torch.library.register_autograd``'s
  contract: ``inputs`` is the tuple of forward's arguments, ``output`` its return value);
* ``backward(ctx, *grads)``: one gradient (or None) per argument of forward.

:class:`AutogradOp` turns that into (a) the custom op ``fastkern::<name>`` with the fake and the
autograd registered on it (what torch.compile sees, and the name compiled graphs and exported
programs record), and (b) an eager ``torch.autograd.Function`` whose forward calls the same
``forward`` and ``setup_context`` and whose backward *is* ``backward``. Calling the AutogradOp picks
(a) while torch.compile traces and (b) otherwise: the custom-op autograd wrapper costs more host
time per call than a Function (docs/benchmarks.md, "Host cost of an op call"), and on the GPU a
fine-tuning step of a small model is host-bound.

A backward usually calls kernels of its own (a ``*_backward`` custom op). :func:`backward_dispatch`
makes the one call that backward writes go to that custom op when the backward runs as the custom
op's registered autograd (so a traced backward graph, from torch.compile, aot_function or export,
holds an opaque op with a fake, not a kernel launch) and straight to the implementation when it
runs as the eager Function's backward. (``torch.compiler.is_compiling()`` cannot tell: it is false
under aot_function and opcheck's tracing.)

``aux_outputs``: trailing outputs of forward that exist only for backward (RMSNorm's rstd, the
LoRA product x @ A.T). The custom op returns them (torch.compile needs every tensor forward makes
as an output to save it) and marks them non-differentiable; the eager Function returns only the
leading outputs; either way ``backward`` receives gradients of the leading outputs only, and calling
the AutogradOp returns only those.

``eager_packed_from``: the eager Function takes forward's arguments from that index on as one tuple
(``autograd.Function.apply`` spends Python calls per argument; LoRA's op has thirteen, most of them
options and frozen quantization state). The packed arguments must never need a gradient: backward
returns None for them, and reads ``ctx.needs_input_grad`` only below that index (the eager Function's
has one entry for the whole tuple).
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch._C import _are_functorch_transforms_active as _functorch_transforms_active
from torch._C._functorch import unwrap_if_dead as _unwrap_if_dead


# Set while the custom op's registered backward runs (traced by torch.compile / AOTAutograd / export,
# or run eagerly when someone calls the custom op directly); thread-local, as autograd may run
# backward on a device thread.
_in_op_backward = threading.local()


def backward_dispatch(op: Callable, impl: Callable) -> Callable:
    """A function calling ``op`` (a custom op) inside a custom op's registered backward and ``impl``
    (same arguments) inside the eager Function's backward or anywhere else."""
    state = _in_op_backward

    def call(*args):
        if getattr(state, "active", False):
            return op(*args)
        return impl(*args)

    call.__name__ = getattr(impl, "__name__", "call")
    return call


def _flagged(backward: Callable) -> Callable:
    def op_backward(ctx, *grads):
        previous = getattr(_in_op_backward, "active", False)
        _in_op_backward.active = True
        try:
            return backward(ctx, *grads)
        finally:
            _in_op_backward.active = previous
    return op_backward


class AutogradOp:
    """``fastkern::<name>`` from one (forward, fake, setup_context, backward) definition (module docstring).

    Attributes: ``op`` (the custom op), ``function`` (the eager autograd.Function); calling the
    instance runs the op through the one that fits (``op`` under torch.compile, ``function``
    eagerly) and returns forward's leading (non-auxiliary) outputs.
    """

    def __init__(self, name: str, forward: Callable, *, fake: Callable, setup_context: Callable,
                 backward: Callable, aux_outputs: int = 0, eager_packed_from: int | None = None):
        self.op = torch.library.custom_op(f"fastkern::{name}", forward, mutates_args=())
        self.op.register_fake(fake)
        if aux_outputs:
            def op_setup_context(ctx, inputs, output):
                setup_context(ctx, inputs, output)
                ctx.mark_non_differentiable(*output[-aux_outputs:])

            def leading_backward(ctx, *grads):
                return backward(ctx, *grads[:-aux_outputs])

            self.op.register_autograd(_flagged(leading_backward), setup_context=op_setup_context)
        else:
            self.op.register_autograd(_flagged(backward), setup_context=setup_context)
        self.function = _eager_function(name, forward, setup_context, backward, aux_outputs, eager_packed_from)
        self._aux_outputs = aux_outputs
        self._packed_from = eager_packed_from
        self._apply = super(torch.autograd.Function, self.function).apply  # the C apply, bound to the Function

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            output = self.op(*args)
            if self._aux_outputs:
                leading = output[:-self._aux_outputs]
                return leading[0] if len(leading) == 1 else leading
            return output
        if self._packed_from is not None:
            args = (*args[:self._packed_from], args[self._packed_from:])
        if _functorch_transforms_active():
            return self.function.apply(*args)
        # What ``Function.apply`` does for a Function without setup_context outside functorch
        # transforms, minus its per-argument generator (a Python call per argument, for every op of
        # every layer): unwrap tensors left over from exited transforms, then autograd's C apply.
        return self._apply(*[_unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a for a in args])


def _eager_function(name: str, forward: Callable, setup_context: Callable, backward: Callable,
                    aux_outputs: int, packed_from: int | None = None) -> type:
    """The autograd.Function running the definition eagerly: forward + setup_context, then backward."""
    if aux_outputs:
        def function_forward(ctx, *args):
            if packed_from is not None:
                args = args[:packed_from] + args[packed_from]
            output = forward(*args)
            setup_context(ctx, args, output)
            leading = output[:-aux_outputs]
            return leading[0] if len(leading) == 1 else leading
    else:
        def function_forward(ctx, *args):
            if packed_from is not None:
                args = args[:packed_from] + args[packed_from]
            output = forward(*args)
            setup_context(ctx, args, output)
            return output
    function_backward = backward
    if packed_from is not None:
        def function_backward(ctx, *grads):
            return backward(ctx, *grads)[:packed_from] + (None,)

    class_name = "".join(part.capitalize() for part in name.split("_")) + "Function"
    return type(class_name, (torch.autograd.Function,), {
        "__doc__": f"Eager autograd of fastkern::{name}: its forward, setup_context and backward, without "
                   f"the custom-op dispatch.",
        "__module__": getattr(forward, "__module__", __name__),
        "forward": staticmethod(function_forward),
        "backward": staticmethod(function_backward),
    })
