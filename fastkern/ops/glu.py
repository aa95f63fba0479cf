"""SwiGLU / GeGLU: out = act(gate) * up, differentiable in gate and up.

Tiers: the Triton kernels in fastkern/kernels/glu.py, launched by ``_launch_*`` below; three custom
ops (``fastkern::glu_forward``, ``fastkern::glu_backward``, ``fastkern::glu_backward_into_inputs``)
with fake implementations so torch.compile(fullgraph=True) traces through them; one autograd
definition (``_setup_context`` / ``_backward``) that ops/_autograd.py registers on the forward op and
turns into the eager autograd.Function; and the public functions :func:`swiglu` and :func:`geglu`.

Each custom op dispatches per call (fastkern.runtime.path_for): compiled kernel on CUDA, the same
kernel under Triton's interpreter on CPU when TRITON_INTERPRET=1, the PyTorch reference otherwise.
fp64 inputs always take the reference (the kernels compute in fp32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.glu import glu_backward_reference, glu_forward_reference
from ._autograd import AutogradOp, backward_dispatch
from ._common import (FLOAT_DTYPES, INT32_MAX, as_rows, cdiv, check_like,
                      check_tensor, device_guard, needs_int64, op_path, output_buffer)

# The kernels' ACTIVATION constexpr: the branches of _activation in fastkern/kernels/glu.py.
_ACTIVATION_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of n_cols elements.

    2048 columns per program keeps 8 warps each issuing 16-byte bf16 loads, and divides the common
    intermediate sizes (11008 = 5.375 blocks is the worst case: 11% masked lanes in the last block).
    """
    if n_cols >= 2048:
        return 2048, 8
    block = max(16, 1 << (max(n_cols, 1) - 1).bit_length())
    return block, 4 if block >= 512 else 2


def _round_bf16(t: Tensor, path: str) -> bool:
    """Whether the kernel must round bf16 by hand: bf16 under the interpreter (fastkern/kernels/bf16.py)."""
    return path == "interpreter" and t.dtype == torch.bfloat16


def _row_layout(tensors: list[Tensor], block, num_warps):
    """[rows, cols] views (strided), grid, block, warps: the general, non-contiguous case."""
    views = [as_rows(t) for t in tensors]
    rows, cols = views[0].shape
    default_block, default_warps = launch_config(cols)
    block, num_warps = block or default_block, num_warps or default_warps
    return views, cols, (rows, cdiv(cols, block)), block, num_warps


def _is_flat(tensors: tuple[Tensor, ...], flat: bool | None) -> bool:
    contiguous = True
    for t in tensors:  # a loop, not all(<generator>): each resumption is a Python call, on every launch
        if not t.is_contiguous():
            contiguous = False
            break
    if flat and not contiguous:
        raise ValueError("fastkern glu launcher: flat=True needs contiguous operands")
    return contiguous if flat is None else flat


def flat_needs_int64(n: int, block: int) -> bool:
    """A flat launch's largest offset, masked lanes included, is below n + block."""
    return n + block > INT32_MAX


# The flat launches below are the patched MLP's path (contiguous gate/up): they pass the tensors as
# they are and literal strides (column stride 1; row stride unused, the row index of a flat launch
# is 0), so the host reads no strides and builds no views. On the H100 host every Python-level
# tensor call costs microseconds, and these ops run three times per layer and step under
# checkpointing (docs/glu.md, host time).
def _launch_forward(gate: Tensor, up: Tensor, out: Tensor, activation: str, block=None, num_warps=None,
                    flat=None, force_int64=False, round_bf16=False) -> None:
    from ..kernels.glu import glu_forward_kernel

    act = _ACTIVATION_IDS[activation]
    if _is_flat((gate, up, out), flat):
        n = gate.numel()
        default_block, default_warps = launch_config(n)
        block, num_warps = block or default_block, num_warps or default_warps
        with device_guard(gate):
            glu_forward_kernel[(cdiv(n, block),)](
                gate, up, out, n, 0, 1, 0, 1, 0, 1, ACTIVATION=act, BLOCK=block,
                INT64_OFFSETS=force_int64 or flat_needs_int64(n, block), FLAT=True, ROUND_BF16=round_bf16,
                num_warps=num_warps)
        return
    (g, u, o), cols, grid, block, num_warps = _row_layout([gate, up, out], block, num_warps)
    with device_guard(gate):
        glu_forward_kernel[grid](
            g, u, o, cols,
            g.stride(0), g.stride(1), u.stride(0), u.stride(1), o.stride(0), o.stride(1),
            ACTIVATION=act, BLOCK=block,
            INT64_OFFSETS=force_int64 or needs_int64(g, u, o, slack=block), FLAT=False, ROUND_BF16=round_bf16,
            num_warps=num_warps,
        )


def _launch_backward(grad_out, gate, up, grad_gate, grad_up, activation: str, block=None, num_warps=None,
                     flat=None, force_int64=False, round_bf16=False) -> None:
    from ..kernels.glu import glu_backward_kernel

    act = _ACTIVATION_IDS[activation]
    if _is_flat((grad_out, gate, up, grad_gate, grad_up), flat):
        n = gate.numel()
        default_block, default_warps = launch_config(n)
        block, num_warps = block or default_block, num_warps or default_warps
        with device_guard(gate):
            glu_backward_kernel[(cdiv(n, block),)](
                grad_out, gate, up, grad_gate, grad_up, n, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, ACTIVATION=act,
                BLOCK=block, INT64_OFFSETS=force_int64 or flat_needs_int64(n, block), FLAT=True,
                ROUND_BF16=round_bf16, num_warps=num_warps)
        return
    (d, g, u, dg, du), cols, grid, block, num_warps = _row_layout(
        [grad_out, gate, up, grad_gate, grad_up], block, num_warps)
    with device_guard(gate):
        glu_backward_kernel[grid](
            d, g, u, dg, du, cols,
            d.stride(0), d.stride(1), g.stride(0), g.stride(1), u.stride(0), u.stride(1),
            dg.stride(0), dg.stride(1), du.stride(0), du.stride(1),
            ACTIVATION=act, BLOCK=block,
            INT64_OFFSETS=force_int64 or needs_int64(d, g, u, dg, du, slack=block), FLAT=False,
            ROUND_BF16=round_bf16, num_warps=num_warps,
        )


def _writable_rows(t: Tensor) -> Tensor | None:
    """A [rows, cols] view sharing t's storage, or None if t's leading dims cannot be merged."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def _forward_impl(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    if gate.numel() == 0:
        return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    path = op_path(gate)
    if path == "reference":
        return glu_forward_reference(gate, up, activation).contiguous()
    out = output_buffer(gate.shape, gate.dtype, gate.device)
    _launch_forward(gate, up, out, activation, round_bf16=_round_bf16(gate, path))
    return out


def _backward_impl(grad_out: Tensor, gate: Tensor, up: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    path = "reference" if gate.numel() == 0 else op_path(gate)
    if path == "reference":
        grad_gate, grad_up = glu_backward_reference(grad_out, gate, up, activation)
        return grad_gate.contiguous(), grad_up.contiguous()
    grad_gate = output_buffer(gate.shape, gate.dtype, gate.device)
    grad_up = output_buffer(up.shape, up.dtype, up.device)
    _launch_backward(grad_out, gate, up, grad_gate, grad_up, activation, round_bf16=_round_bf16(gate, path))
    return grad_gate, grad_up


def _backward_into_inputs_impl(grad_out: Tensor, gate: Tensor, up: Tensor, activation: str) -> None:
    """Writes d(gate) into gate's storage and d(up) into up's storage."""
    if gate.numel() == 0:
        return
    g_rows, u_rows = _writable_rows(gate), _writable_rows(up)
    path = op_path(gate)
    if path == "reference" or g_rows is None or u_rows is None:
        grad_gate, grad_up = glu_backward_reference(grad_out, gate, up, activation)
        gate.copy_(grad_gate)
        up.copy_(grad_up)
        return
    _launch_backward(grad_out, gate, up, gate, up, activation, round_bf16=_round_bf16(gate, path))


# Custom ops: what torch.compile sees (fake impls give it shapes). The forward op and its autograd
# come from one definition (ops/_autograd.py), which also gives eager calls a lighter
# autograd.Function: the custom-op autograd wrapper costs ~0.5 ms of host time per forward+backward,
# measured on the H100 host (docs/glu.md).
@torch.library.custom_op("fastkern::glu_backward", mutates_args=())
def glu_backward_op(grad_out: Tensor, gate: Tensor, up: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    return _backward_impl(grad_out, gate, up, activation)


@glu_backward_op.register_fake
def _(grad_out, gate, up, activation):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(up.shape, dtype=up.dtype, device=up.device))


@torch.library.custom_op("fastkern::glu_backward_into_inputs", mutates_args=("gate", "up"))
def glu_backward_into_inputs_op(grad_out: Tensor, gate: Tensor, up: Tensor, activation: str) -> None:
    _backward_into_inputs_impl(grad_out, gate, up, activation)


@glu_backward_into_inputs_op.register_fake
def _(grad_out, gate, up, activation):
    return None


def _backward_into_inputs_eager(grad_out: Tensor, gate: Tensor, up: Tensor, activation: str) -> None:
    _backward_into_inputs_impl(grad_out, gate, up, activation)
    # A Triton store is invisible to autograd: bump the version counters so any other node that saved
    # gate or up fails loudly instead of reading gradients as activations (the custom op, run eagerly,
    # bumps them too, as it declares gate and up mutated; under torch.compile the mutation is functionalized).
    torch.autograd.graph.increment_version(gate)
    torch.autograd.graph.increment_version(up)


_glu_backward = backward_dispatch(glu_backward_op, _backward_impl)
_glu_backward_into_inputs = backward_dispatch(glu_backward_into_inputs_op, _backward_into_inputs_eager)


def _glu_forward(gate: Tensor, up: Tensor, activation: str, overwrite_inputs_in_backward: bool) -> Tensor:
    return _forward_impl(gate, up, activation)


def _fake_forward(gate, up, activation, overwrite_inputs_in_backward):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


def _setup_context(ctx, inputs, output):
    gate, up, activation, overwrite = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation
    ctx.overwrite = overwrite


def _backward(ctx, grad_out):
    gate, up = ctx.saved_tensors
    grad_out = grad_out.to(gate.dtype)
    if ctx.overwrite:
        _glu_backward_into_inputs(grad_out, gate, up, ctx.activation)
        return gate, up, None, None
    grad_gate, grad_up = _glu_backward(grad_out, gate, up, ctx.activation)
    return (grad_gate if ctx.needs_input_grad[0] else None,
            grad_up if ctx.needs_input_grad[1] else None, None, None)


_GLU = AutogradOp("glu_forward", _glu_forward, fake=_fake_forward, setup_context=_setup_context, backward=_backward)
glu_forward_op = _GLU.op
GLUFunction = _GLU.function


def _can_overwrite(gate: Tensor, up: Tensor) -> bool:
    # Reusing the inputs' storage for their gradients is only safe for intermediate activations that
    # both need gradients (a leaf's storage is a parameter or user data), that do not share storage
    # with each other, and whose grad_fn graph we are the only reader of (autograd's version counter
    # turns a violation of that last rule into a loud error, not a wrong gradient).
    if not (gate.requires_grad and up.requires_grad) or gate.is_leaf or up.is_leaf:
        return False
    if torch.compiler.is_compiling():
        # Dynamo cannot trace storage pointers, and need not: the traced backward is functionalized,
        # so the mutating backward op gets its own copies of inputs that alias each other.
        return True
    return gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr()


def _glu(op: str, gate: Tensor, up: Tensor, activation: str, overwrite_inputs_in_backward: bool) -> Tensor:
    check_tensor(op, "gate", gate, dtypes=FLOAT_DTYPES)
    check_tensor(op, "up", up, dtypes=FLOAT_DTYPES)
    check_like(op, "gate", gate, "up", up)
    overwrite = bool(overwrite_inputs_in_backward) and _can_overwrite(gate, up)
    return _GLU(gate, up, activation, overwrite)


def swiglu(gate: Tensor, up: Tensor, *, overwrite_inputs_in_backward: bool = False) -> Tensor:
    """``silu(gate) * up`` in one pass; backward recomputes silu(gate).

    gate and up: same shape, dtype (fp32, bf16, fp16; fp64 runs the reference) and device; any
    leading shape and strides. Math is fp32; the output and gradients have the input dtype.

    ``overwrite_inputs_in_backward=True`` lets backward write d(gate) and d(up) into the storage of
    gate and up (as the patched MLP does: there they are private intermediates), so forward+backward
    allocates nothing beyond the output. Leave it off if you read gate or up after backward.

    >>> import torch, fastkern
    >>> g, u = torch.randn(4, 8), torch.randn(4, 8)
    >>> torch.allclose(fastkern.ops.swiglu(g, u), torch.nn.functional.silu(g) * u, atol=1e-6)
    True
    """
    return _glu("fastkern.ops.swiglu", gate, up, "silu", overwrite_inputs_in_backward)


def geglu(gate: Tensor, up: Tensor, approximate: str = "tanh", *, overwrite_inputs_in_backward: bool = False) -> Tensor:
    """``gelu(gate, approximate=approximate) * up`` in one pass; ``approximate`` is "tanh" or "none".

    Same contract as :func:`swiglu`.

    >>> import torch, fastkern
    >>> g, u = torch.randn(4, 8), torch.randn(4, 8)
    >>> ref = torch.nn.functional.gelu(g, approximate="tanh") * u
    >>> torch.allclose(fastkern.ops.geglu(g, u), ref, atol=1e-6)
    True
    """
    if approximate not in ("tanh", "none"):
        raise ValueError(f"fastkern.ops.geglu: `approximate` must be 'tanh' or 'none', got {approximate!r}")
    activation = "gelu_tanh" if approximate == "tanh" else "gelu"
    return _glu("fastkern.ops.geglu", gate, up, activation, overwrite_inputs_in_backward)
