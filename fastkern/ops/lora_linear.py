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
* Inside a reentrant checkpoint's rerun (:func:`reusing_dequantized_weights`, which fastkern's
  ``checkpointing="recompute"`` enters), each op's backward follows its rerun within the same layer,
  so the rerun's 16-bit W is kept for that backward instead of dequantized a second time: one launch
  and its host work less per NF4 projection per step, for one layer's 16-bit weights held between
  the rerun and the backward (below ``REUSE_MAX_ROWS`` tokens, where the host is what limits the step).
* Under :func:`fastkern.ops.unused_output.output_unused` (a rerun's last projection, whose output
  values nobody reads) the call computes only xs and leaves y uninitialized; backward is unchanged.

Tiers: the implementations ``_forward_impl`` / ``_backward_impl`` (taking the custom ops' flat
arguments, so the eager paths call them directly); one autograd definition
(``_setup_context`` / ``_backward``) that ops/_autograd.py registers on the custom op
``fastkern::lora_linear_forward`` (what torch.compile sees; its backward calls
``fastkern::lora_linear_backward``) and turns into the eager autograd.Function; and the public
:func:`lora_linear`, which checks its arguments with a few attribute reads when they are plain
tensors of one dtype and device (the common case: it runs for every LoRA projection of every layer)
and spells each check out otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter

from ._autograd import AutogradOp, backward_dispatch
from ._common import KERNEL_DTYPES, FLOAT_DTYPES, check_tensor, output_buffer
from .nf4 import FlatNF4, dequantize_into, flatten_state
from .unused_output import request as _unused, take_output_unused

# (code, absmax, absmax2, code2, offset, blocksize, nested_blocksize) of an NF4 base, or None.
Quant = tuple | None

# Above this many rows (tokens) a call re-dequantizes W in backward even while reusing: there the GPU,
# not the host, limits the step, the dequantization is ~1% of the GEMM, and a long sequence's memory
# is better spent on activations (an 8B layer's 16-bit weights are ~0.4 GiB).
REUSE_MAX_ROWS = 16384


# Set by reusing_dequantized_weights(); ``last`` passes (x, W, concatenated) from _forward_impl to
# _setup_context of the same call (the eager Function calls them back to back on one thread). Class
# defaults, so the per-call reads are plain attribute reads.
class _Reuse(threading.local):
    active = False  # inside reusing_dequantized_weights()
    last = None  # (x, W, concatenated) of the last NF4 forward, for its _setup_context
    skip_output = False  # this call's output is unused (ops/unused_output.py)


_reuse = _Reuse()

# 16-bit copies of float32 adapter parameters (PEFT keeps adapters in float32 under a 16-bit model), per
# parameter: (a weak reference to it, its version counter, storage and the dtype when cast, the copy).
# Every forward casts afresh (a write through ``.data`` between steps, which no version counter sees,
# is picked up); a checkpoint's rerun (inside reusing_dequantized_weights) and backward reuse the
# forward's copy while the version and storage are unchanged: one cast per parameter per step instead
# of an autograd cast in forward and in the rerun plus a node casting its gradient back. Keyed by id (a
# WeakKeyDictionary would compare tensors with ``==``); an entry goes with its parameter.
_casts: dict[int, tuple] = {}


def _in_dtype(t: Tensor, dtype: torch.dtype, fresh: bool = False) -> Tensor:
    """``t`` in ``dtype``, without autograd (the op returns gradients in ``t``'s own dtype). For a
    Parameter, the copy of the last forward is reused unless ``fresh`` or the parameter has changed."""
    # Called inside the autograd Functions' forward and backward and by the custom ops' implementations,
    # where autograd records nothing, and never traced by torch.compile (which sees the custom ops): a
    # plain ``to`` (no detach, no no_grad context, no compile check: host work per adapter per call).
    if t.dtype == dtype:  # callers test this first; here so that no entry ever holds a parameter itself
        return t
    if t.__class__ is not Parameter:
        return t.to(dtype)
    ident = id(t)
    key = (t._version, t.data_ptr(), dtype)
    if not fresh:
        hit = _casts.get(ident)
        if hit is not None and hit[0]() is t and hit[1] == key:
            return hit[2]
    copy = t.to(dtype)
    _casts[ident] = (weakref.ref(t, functools.partial(_drop_cast, ident)), key, copy)
    return copy


def _drop_cast(ident: int, ref) -> None:
    hit = _casts.get(ident)
    if hit is not None and hit[0] is ref:  # not an entry of a newer tensor that reused the id
        del _casts[ident]


@contextlib.contextmanager
def reusing_dequantized_weights():
    """Within this context an NF4 call's dequantized W is kept for its backward instead of recomputed.

    For a region whose backward runs before it is run again or left for long: a reentrant
    checkpoint's rerun in backward, where each kept W lives until its op's backward right after. Around
    a plain forward it would keep every layer's 16-bit weights until the loss's backward. Same math:
    the kept W is the one backward would dequantize (the version checks still apply)."""
    previous = _reuse.active
    _reuse.active = True
    try:
        yield
    finally:
        _reuse.active = previous
        _reuse.last = None


def _concat_path(k: int, n: int, nf4: bool) -> bool:
    # Forward: folding the LoRA term into the NF4 GEMM costs the [x | xs] copy (~4MK bytes); the
    # beta = 1 scheme costs ~4MN (one more [M, N] write + read).
    return nf4 and 2 * k <= 3 * n


def _concat_backward(k: int, n: int, nf4: bool) -> bool:
    # Backward: [dY W | dY B] = dY @ [W | B] leaves dX as the first K columns of an [M, K + r] result,
    # a view with row stride K + r. dX must leave this op contiguous: torch 2.11's cuDNN attention
    # backward reads a strided grad_out as if it were contiguous (wrong q/k/v gradients, ~140% error,
    # when dX flows from o_proj into attention), and other consumers may assume it too.
    # Copying dX out costs ~4MK bytes; the beta = 1 scheme instead reads dY a second time for dY @ B
    # (2MN). So the concatenated GEMM pays only when N > 2K (e.g. 4096 -> 14336, gate/up of Llama).
    return nf4 and n > 2 * k


def _dequantized(weight: Tensor, quant: Quant, lora_b: Tensor, k: int, concat: bool) -> Tensor:
    """W in 16 bits: [N, K], or [W | B] as one [N, K + r] buffer when ``concat`` (``lora_b`` already in
    the compute dtype)."""
    n, r = lora_b.shape
    buf = output_buffer((n, k + r if concat else k), lora_b.dtype, lora_b.device)
    dequantize_into(buf[:, :k] if concat else buf, weight, *quant)
    if concat:
        buf[:, k:].copy_(lora_b)
    return buf


# The implementations take the custom ops' flat arguments (the NF4 state is ``code``..
# ``nested_blocksize``; ``code`` None: a dense base) and are called directly by the eager paths: no
# adapter call in between, as they run for every LoRA projection.


def _forward_impl(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None,
                  code: Tensor | None, absmax: Tensor | None, absmax2: Tensor | None, code2: Tensor | None,
                  offset: Tensor | None, scaling: float, blocksize: int,
                  nested_blocksize: int) -> tuple[Tensor, Tensor]:
    """x: [M, K]. Returns (y [M, N], xs = scaling * x @ A.T [M, r]); xs is saved for backward. A and B
    of another float dtype than x are used in x's (``_in_dtype``)."""
    quant = None if code is None else (code, absmax, absmax2, code2, offset, blocksize, nested_blocksize)
    k = x.shape[1]
    if lora_a.dtype != x.dtype:  # a forward casts afresh; a checkpoint's rerun reuses that cast
        lora_a = _in_dtype(lora_a, x.dtype, fresh=not _reuse.active)
    if lora_b.dtype != x.dtype:
        lora_b = _in_dtype(lora_b, x.dtype, fresh=not _reuse.active)
    xs = F.linear(x, lora_a)
    if scaling != 1.0:  # lora_alpha / r is often exactly 1 (PEFT's defaults): skip a kernel launch then
        xs.mul_(scaling)
    if _reuse.skip_output:
        # Output values unused (ops/unused_output.py): no dequantization, no GEMM; backward dequantizes.
        return output_buffer((x.shape[0], lora_b.shape[0]), x.dtype, x.device), xs
    concat = quant is not None and _concat_path(k, lora_b.shape[0], True)
    w = weight if quant is None else _dequantized(weight, quant, lora_b, k, concat)
    if quant is not None and _reuse.active and x.shape[0] <= REUSE_MAX_ROWS:
        _reuse.last = (x, w, concat)
    if concat:  # w is [W | B]
        x_cat = torch.cat([x, xs], dim=1)
        return (torch.mm(x_cat, w.t()) if bias is None else torch.addmm(bias, x_cat, w.t())), xs
    return F.linear(xs, lora_b, bias).addmm_(x, w.t()), xs


def _backward_impl(grad_out: Tensor, x: Tensor, xs: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                   code: Tensor | None, absmax: Tensor | None, absmax2: Tensor | None, code2: Tensor | None,
                   offset: Tensor | None, scaling: float, blocksize: int, nested_blocksize: int,
                   need_x: bool, need_a: bool, need_b: bool, need_bias: bool, kept: tuple | None = None,
                   grad_x_into: Tensor | None = None):
    """(dX [M, K], dA [r, K], dB [N, r], dbias [N]); a gradient not asked for is None. ``kept``: the
    forward's (W, concatenated) of an NF4 call under reusing_dequantized_weights, or None.
    ``grad_x_into``: an [M, K] dX of other projections of the same x (ops/lora_linear_group.py), to
    which this dX is added in place and which is returned as dX."""
    quant = None if code is None else (code, absmax, absmax2, code2, offset, blocksize, nested_blocksize)
    k = x.shape[1]
    dy = grad_out.contiguous()
    grad_x = g = None
    a_dtype, b_dtype = lora_a.dtype, lora_b.dtype  # the gradients' dtypes (x's for the products)
    if a_dtype != x.dtype:
        lora_a = _in_dtype(lora_a, x.dtype)
    if b_dtype != x.dtype:
        lora_b = _in_dtype(lora_b, x.dtype)
    if need_x:
        concat = quant is not None and _concat_backward(k, lora_b.shape[0], True)
        if quant is None:
            w = weight
        elif kept is not None and (kept[1] or not concat):
            # N > 2K (concat here) implies 2K <= 3N (concat in forward): the forward's [W | B] serves
            # both schemes, its first K columns being W (row stride K + r, which the GEMMs take as is).
            w = kept[0][:, :k] if kept[1] and not concat else kept[0]
        else:
            w = _dequantized(weight, quant, lora_b, k, concat)
        if concat:
            both = torch.mm(dy, w)  # w is [W | B]: [dY W | dY B]
            g = both[:, k:] * scaling  # s dY B, a new [M, r] tensor
            # Out of place: dX is a new contiguous [M, K] tensor (see _concat_backward).
            grad_x = (torch.addmm(both[:, :k], g, lora_a) if grad_x_into is None
                      else grad_x_into.add_(both[:, :k]).addmm_(g, lora_a))
        else:
            g = torch.mm(dy, lora_b)
            if scaling != 1.0:
                g.mul_(scaling)
            grad_x = (torch.mm(g, lora_a) if grad_x_into is None else grad_x_into.addmm_(g, lora_a)).addmm_(dy, w)
    elif need_a:  # no dX wanted (e.g. the first layer's input): W is not needed at all
        g = torch.mm(dy, lora_b)
        if scaling != 1.0:
            g.mul_(scaling)
    grad_a, grad_b = _adapter_grads(g, dy, x, xs, need_a, need_b, a_dtype, b_dtype)
    return grad_x, grad_a, grad_b, dy.sum(0) if need_bias else None


def _adapter_grads(g: Tensor, dy: Tensor, x: Tensor, xs: Tensor, need_a: bool, need_b: bool,
                   a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple:
    """(dA = g.T x, dB = dY.T xs) with g = s dY B, each in its adapter's dtype; None where not needed."""
    grad_a = torch.mm(g.t(), x) if need_a else None
    grad_b = torch.mm(dy.t(), xs) if need_b else None
    if grad_a is not None and a_dtype != grad_a.dtype:
        grad_a = grad_a.to(a_dtype)
    if grad_b is not None and b_dtype != grad_b.dtype:
        grad_b = grad_b.to(b_dtype)
    return grad_a, grad_b


_OP = "fastkern.ops.lora_linear"


def _fake_forward(x, weight, lora_a, lora_b, bias, code, absmax, absmax2, code2, offset, scaling, blocksize,
                  nested_blocksize):
    return x.new_empty((x.shape[0], lora_b.shape[0])), x.new_empty((x.shape[0], lora_a.shape[0]))


@torch.library.custom_op("fastkern::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(
    grad_out: Tensor, x: Tensor, xs: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
    code: Tensor | None, absmax: Tensor | None, absmax2: Tensor | None, code2: Tensor | None,
    offset: Tensor | None, scaling: float, blocksize: int, nested_blocksize: int, need_x: bool, need_a: bool,
    need_b: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dX, dA, dB, dbias); a gradient not asked for is zeros (a custom op cannot return None)."""
    grad_x, grad_a, grad_b, grad_bias = _backward_impl(
        grad_out, x, xs, weight, lora_a, lora_b, code, absmax, absmax2, code2, offset, scaling, blocksize,
        nested_blocksize, need_x, need_a, need_b, need_bias)
    return (grad_x if need_x else x.new_zeros(x.shape), grad_a if need_a else lora_a.new_zeros(lora_a.shape),
            grad_b if need_b else lora_b.new_zeros(lora_b.shape),
            grad_bias if need_bias else grad_out.new_zeros(grad_out.shape[1]))


@lora_linear_backward_op.register_fake
def _(grad_out, x, xs, weight, lora_a, lora_b, code, absmax, absmax2, code2, offset, scaling, blocksize,
      nested_blocksize, need_x, need_a, need_b, need_bias):
    return (x.new_empty(x.shape), lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape),
            grad_out.new_empty((grad_out.shape[1],)))


_backward_call = backward_dispatch(lora_linear_backward_op, _backward_impl)


def _setup_context(ctx, inputs, output):
    # Module parameters (the frozen base weight, and A / B when they are the adapters' own parameters
    # rather than cast copies) are held on ctx by reference, not saved: saving a tensor costs the
    # saved-tensor hooks' work (torch.utils.checkpoint's run about ten Python calls per tensor, in
    # forward and in recomputation) and buys nothing for a parameter, which lives as long as its
    # module either way. What saving adds is autograd's check that a saved tensor is not modified in
    # place before backward (an optimizer step between forward and backward, a weight edited under
    # no_grad): the versions recorded here repeat that check in backward. (Like autograd's, it cannot
    # see writes through ``.data``.) Activations (x, xs, cast adapters) are saved, so checkpointing
    # and offloading still free them. The NF4 quantization state is frozen module state too.
    x, weight, lora_a, lora_b, bias, code, absmax, absmax2, code2, offset, scaling, blocksize, nested = inputs
    # An exact Parameter, or a plain Tensor that is no view, is told by attribute reads alone.
    held_w = weight.__class__ is Parameter or (
        (weight.__class__ is not Tensor or weight._base is not None) and _parameter_or_view(weight))
    held_a = lora_a.__class__ is Parameter or (
        (lora_a.__class__ is not Tensor or lora_a._base is not None) and _parameter_or_view(lora_a))
    held_b = lora_b.__class__ is Parameter or (
        (lora_b.__class__ is not Tensor or lora_b._base is not None) and _parameter_or_view(lora_b))
    ctx.save_for_backward(x, output[1], None if held_w else weight, None if held_a else lora_a,
                          None if held_b else lora_b)
    ctx.held = (weight if held_w else None, lora_a if held_a else None, lora_b if held_b else None)
    ctx.quant = None if code is None else (code, absmax, absmax2, code2, offset)
    ctx.versions = ((weight._version, lora_a._version, lora_b._version) if code is None
                    else _versions(weight, lora_a, lora_b, ctx.quant))
    ctx.opts = (scaling, blocksize, nested)
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.kept = None
    last = None if code is None else _reuse.last  # dense calls keep nothing
    if last is not None:
        _reuse.last = None
        if last[0] is x:  # this call's own W (anything else is discarded, never used)
            ctx.kept = last[1:]


def _parameter_or_view(t: Tensor) -> bool:
    """Whether ``t`` is a Parameter or a view of one (NF4's packed bytes are a flat view of the
    Params4bit). A view shares its base's version counter, so the version check covers it too."""
    if t._base is not None:
        t = t._base
    # issubclass first: isinstance(t, Parameter) is a Python __instancecheck__ (it also accepts
    # tensors flagged ``_is_param``), a Parameter subclass such as Params4bit needs no more.
    return issubclass(t.__class__, Parameter) or isinstance(t, Parameter)


def _versions(weight: Tensor, lora_a: Tensor, lora_b: Tensor, quant) -> tuple[int, ...]:
    """Version counters of what backward reads by reference (a dense call inlines the first three)."""
    code, absmax, absmax2, code2, offset = quant
    return (weight._version, lora_a._version, lora_b._version, code._version, absmax._version,
            -1 if absmax2 is None else absmax2._version, -1 if code2 is None else code2._version,
            -1 if offset is None else offset._version)


def _modified_error(before: tuple[int, ...], after: tuple[int, ...]) -> RuntimeError:
    names = ("weight", "lora_A", "lora_B", "quant_state.code", "quant_state.absmax", "quant_state.absmax2",
             "quant_state.code2", "quant_state.offset")
    changed = [f"`{n}` (version {b} at forward, {a} now)" for n, b, a in zip(names, before, after) if a != b]
    return RuntimeError(
        f"{_OP}: one of the tensors needed for gradient computation has been modified by an inplace "
        f"operation between forward and backward: {', '.join(changed)}")


def _backward(ctx, grad_out):
    x, xs, weight, lora_a, lora_b = ctx.saved_tensors
    held_w, held_a, held_b = ctx.held
    if held_w is not None:
        weight = held_w
    if held_a is not None:
        lora_a = held_a
    if held_b is not None:
        lora_b = held_b
    quant = ctx.quant
    versions = ((weight._version, lora_a._version, lora_b._version) if quant is None
                else _versions(weight, lora_a, lora_b, quant))
    if versions != ctx.versions:
        raise _modified_error(ctx.versions, versions)
    code, absmax, absmax2, code2, offset = quant or (None,) * 5
    needs = ctx.needs_input_grad
    need_bias = ctx.bias_grad and needs[4]
    kept, ctx.kept = ctx.kept, None  # released with this backward
    args = (grad_out, x, xs, weight, lora_a, lora_b, code, absmax, absmax2, code2, offset, *ctx.opts,
            needs[0], needs[2], needs[3], need_bias)
    # Only eager calls keep a W (reusing_dequantized_weights), so that call needs no custom op.
    grad_x, grad_a, grad_b, grad_bias = _backward_impl(*args, kept) if kept is not None else _backward_call(*args)
    return (grad_x if needs[0] else None, None, grad_a if needs[2] else None, grad_b if needs[3] else None,
            grad_bias if need_bias else None, None, None, None, None, None, None, None, None)


# One autograd definition (ops/_autograd.py): the custom op fastkern::lora_linear_forward returns (y, xs)
# for torch.compile, xs marked non-differentiable; the eager Function returns y and takes the NF4 state
# and options (arguments 5..12, never differentiable) as one tuple.
_LORA_LINEAR = AutogradOp("lora_linear_forward", _forward_impl, fake=_fake_forward,
                          setup_context=_setup_context, backward=_backward, aux_outputs=1, eager_packed_from=5)
lora_linear_forward_op = _LORA_LINEAR.op
LoRALinearFunction = _LORA_LINEAR.function
_PLAIN = (Tensor, Parameter)
# The NF4 arguments of a dense call: no state, blocksizes 0.
_DENSE = (None, None, None, None, None, 0, 0)


def _check_operand(op: str, name: str, t: Tensor, x: Tensor, any_float: bool = False) -> None:
    check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
    if t.dtype != x.dtype and not any_float:
        raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `x` has {x.dtype}; cast it")
    if t.device != x.device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `x` is on {x.device}")


def _check_operands(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling, bias: Tensor | None,
                    dense: bool) -> None:
    """Each argument's type, dtype and device, spelled out (errors name the argument)."""
    check_tensor(_OP, "x", x, dtypes=KERNEL_DTYPES)
    if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool):
        raise TypeError(f"{_OP}: `scaling` must be a Python number, got {type(scaling).__name__}")
    _check_operand(_OP, "lora_A", lora_A, x, any_float=True)
    _check_operand(_OP, "lora_B", lora_B, x, any_float=True)
    if bias is not None:
        _check_operand(_OP, "bias", bias, x)
    if dense:
        _check_operand(_OP, "weight", weight, x)


def _prepare(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling, bias: Tensor | None,
             quant_state) -> tuple[Tensor, tuple, int]:
    """Checks one call's arguments; returns (W as the kernels take it: the dense weight or NF4's packed
    bytes, the NF4 state as the custom op's flat arguments (``_DENSE`` for a dense base), N)."""
    dense = quant_state is None
    plain = x.__class__ in _PLAIN
    dtype, device = (x.dtype, x.device) if plain else (None, None)
    # The common case, told by attribute reads alone: plain tensors (no subclass, e.g. no DTensor) of
    # one supported dtype on one device and a Python number; anything else gets every check spelled out.
    # Adapters may be float32 under a 16-bit x (PEFT's default): used in x's dtype (_in_dtype).
    if not (plain and dtype in KERNEL_DTYPES and lora_A.__class__ in _PLAIN
            and (lora_A.dtype == dtype or lora_A.dtype == torch.float32) and lora_A.device == device
            and lora_B.__class__ in _PLAIN
            and (lora_B.dtype == dtype or lora_B.dtype == torch.float32) and lora_B.device == device
            and (bias is None or (bias.__class__ in _PLAIN and bias.dtype == dtype and bias.device == device))
            and (scaling.__class__ is float or scaling.__class__ is int)
            and (not dense or (weight.__class__ in _PLAIN and weight.dtype == dtype and weight.device == device))):
        _check_operands(x, weight, lora_A, lora_B, scaling, bias, dense)
        dtype, device = x.dtype, x.device
    k = x.shape[-1]
    if lora_A.ndim != 2 or lora_A.shape[1] != k:
        raise ValueError(f"{_OP}: `lora_A` must be [r, {k}] for x [..., {k}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if dense:
        if weight.ndim != 2 or weight.shape[1] != k:
            raise ValueError(f"{_OP}: `weight` must be [N, {k}] for x [..., {k}], got {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{_OP}: `weight` requires grad; lora_linear treats the base weight as frozen")
        n = weight.shape[0]
        w, quant = weight, _DENSE
    else:
        nf4 = flatten_state(_OP, weight, quant_state, dtype=dtype)
        shape = nf4.shape
        if len(shape) != 2 or shape[1] != k:
            raise ValueError(f"{_OP}: `quant_state.shape` {tuple(shape)} is not [N, {k}] for x [..., {k}]")
        n = shape[0]
        # nf4.packed is a plain view of weight (same device): reading weight itself would run a
        # Params4bit's Python __torch_function__.
        if nf4.packed.device != device:
            raise ValueError(f"{_OP}: `weight` is on {nf4.packed.device} but `x` is on {device}")
        w, quant = nf4.packed, (nf4.code, nf4.absmax, nf4.absmax2, nf4.code2, nf4.offset, nf4.blocksize,
                                nf4.nested_blocksize)
    if lora_B.ndim != 2 or lora_B.shape[0] != n or lora_B.shape[1] != r:
        raise ValueError(f"{_OP}: `lora_B` must be [{n}, {r}], got {tuple(lora_B.shape)}")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != n):
        raise ValueError(f"{_OP}: `bias` must be [{n}], got {tuple(bias.shape)}")
    return w, quant, n


def lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, *,
                bias: Tensor | None = None, quant_state=None) -> Tensor:
    """``x @ W.T + bias + scaling * (x @ lora_A.T) @ lora_B.T``, without separate passes for the LoRA term.

    x: [..., K] (fp16/bf16/fp32). weight: dense [N, K] in x's dtype, or the NF4-packed bytes of a
    bitsandbytes ``Params4bit`` (any quant_storage) with ``quant_state`` (bitsandbytes ``QuantState``
    or ``NF4State``). lora_A: [r, K], lora_B: [N, r], any float dtype (PEFT keeps adapters in float32
    under a 16-bit model): the products use them in x's dtype, their gradients come back in their own
    (the values of an autograd cast before the call; a Parameter's copy from the forward is reused by a
    checkpoint's rerun and by backward). bias: [N] or None, in x's dtype.
    Differentiable in x, lora_A, lora_B and bias; the base weight is frozen (a dense weight that
    requires grad is rejected rather than silently left without a gradient). Parameters are held for
    backward by reference (modifying one in place before backward raises there, as autograd does for
    a saved tensor), so saved-tensor hooks (checkpointing, offloading) see only activations.

    >>> import torch, fastkern
    >>> x, w = torch.randn(3, 16), torch.randn(8, 16)
    >>> a, b = torch.randn(4, 16), torch.randn(8, 4)
    >>> y = fastkern.ops.lora_linear(x, w, a, b, 0.5)
    >>> torch.allclose(y, x @ w.T + 0.5 * (x @ a.T) @ b.T, atol=1e-4)
    True
    """
    w, quant, n = _prepare(x, weight, lora_A, lora_B, scaling, bias, quant_state)
    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    scaling = float(scaling)
    if torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        if _unused.pending and take_output_unused() and not torch.compiler.is_compiling():
            _reuse.skip_output = True  # read by _forward_impl of this call (ops/unused_output.py)
            try:
                out = _LORA_LINEAR(x2d, w, lora_A, lora_B, bias, *quant[:5], scaling, *quant[5:])
            finally:
                _reuse.skip_output = False
        else:
            out = _LORA_LINEAR(x2d, w, lora_A, lora_B, bias, *quant[:5], scaling, *quant[5:])
    elif torch.compiler.is_compiling():  # torch.compile sees the custom op, also without gradients
        out = _LORA_LINEAR(x2d, w, lora_A, lora_B, bias, *quant[:5], scaling, *quant[5:])
    else:  # nothing to differentiate: skip autograd's bookkeeping (~10-20 us of host time)
        out = _forward_impl(x2d, w, lora_A, lora_B, bias, *quant[:5], scaling, *quant[5:])[0]
        if quant[0] is not None:
            _reuse.last = None  # no backward will come for a W this call kept
    return out.view(*x.shape[:-1], n)
