"""Rotary position embedding of q and k in one launch, in place (default) or out of place.

Tiers: the Triton kernel in fastkern/kernels/rope.py, launched by ``_launch`` below; the out-of-place
rotation defined once, as (forward, fake, setup_context, backward), and turned by ops/_autograd.py
into the custom op ``fastkern::rope_qk`` (what torch.compile(fullgraph=True) traces; its backward is
itself with ``transpose`` flipped) and the eager autograd.Function that eager calls take (the custom
op's dispatch costs more host time than a launch: docs/rope.md, "Host time"); then the eager
in-place Functions and the public :func:`rope`. Under torch.compile the in-place form is that op
followed by copies into q and k (functionalization turns mutation into that anyway, and Dynamo need
not trace ``mark_dirty``).

The eager in-place Functions are not made from that definition: a custom op's autograd cannot mark
its inputs dirty, and the in-place forms differ in what they mark dirty and return (below). Their
backward is the definition's math, the rotation of the incoming gradients by -theta into new tensors.

The in-place path has to tell autograd that q and k changed (``ctx.mark_dirty``), and q and k
arrive as views (transposed projection outputs). Autograd handles a dirtied view by rebasing it
(a CopySlices node), whose backward costs four extra passes over the gradient, and it cannot
rebase two views dirtied by one Function. So:

* fast path: when q and k are each a dense permuted view covering all of a contiguous base (the
  ``proj(x).view(B, T, H, D).transpose(1, 2)`` of every attention module), ``_RotateBasesInPlace``
  marks the two *bases* dirty (they are not views, so one Function may dirty both) and q_rot, k_rot
  are rebuilt as view+permute of them, whose backward is free. Forward and backward are one launch
  each; backward rotates the incoming gradients into new tensors (never into the caller's).
* general path (any other layout): ``_RotateQInPlace`` runs the single launch that rotates q and k and marks q dirty, and
  ``_MarkKRotated`` marks k dirty right after (nothing can read k in between).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import runtime
from ..reference.rope import rotate_reference
from ._autograd import AutogradOp, backward_dispatch
from ._common import FLOAT_DTYPES, INT32_MAX, cdiv, check_tensor, device_guard, op_path, output_like, reach

_OP = "fastkern.ops.rope"


@functools.lru_cache(maxsize=256)
def launch_config(n_heads: int, half_rotary: int) -> tuple[int, int, int, int, bool]:
    """(BLOCK_T, BLOCK_H, BLOCK_R, num_warps, heads_fastest): tokens and heads per program, pair lanes
    per head, warps, program order.

    Two tokens of about 1024 pairs each per program (16 heads of D=128: 16 KiB of bf16 read and
    written per program) with 4 warps: within 0.5 % of the best BLOCK_T x BLOCK_H x num_warps setting
    of a sweep on an H100 at both bench shapes, and the best at B1 T65536 (docs/rope.md). Blocks of k
    past its last head are masked lanes, which move no memory. Head blocks vary fastest between
    programs (kernel docstring; docs/rope.md has the measurement of both orders).
    """
    block_r = max(2, 1 << (max(half_rotary, 1) - 1).bit_length())
    block_h = max(1, 1 << (max(n_heads, 1) - 1).bit_length())
    block_h = max(1, min(block_h, 1024 // block_r))
    num_warps = 4 if block_h * block_r >= 512 else 2
    return 2, block_h, block_r, num_warps, True


def _launch(q, k, q_out, k_out, cos, sin, position_ids, interleaved, transpose, block_h=None, num_warps=None,
            block_t=None, heads_fastest=None, interpreted=None):
    """Rotate q (and k, if not None) into q_out (k_out); outputs may alias inputs. ``heads_fastest``:
    program order (kernel docstring); the bench sweeps both orders."""
    from ..kernels.rope import rope_qk_kernel

    batch, n_q_heads, seq_len, _ = q.shape
    n_k_heads = k.shape[1] if k is not None else 0
    half = cos.shape[-1] // 2
    default_t, default_h, block_r, default_warps, default_order = launch_config(max(n_q_heads, n_k_heads), half)
    if interpreted is None:
        interpreted = runtime.path_for(q) == "interpreter"
    if interpreted:
        # The interpreter pays per program, not per lane: one block of all q heads and up to 32 tokens.
        # The GPU's own blocks are exercised on CPU by tests/ops/test_rope.py::test_head_and_token_blocks_*.
        default_h = max(1, 1 << (n_q_heads - 1).bit_length())
        default_t = max(1, min(32, 1 << (max(seq_len, 1) - 1).bit_length()))
    block_t, block_h, num_warps = block_t or default_t, block_h or default_h, num_warps or default_warps
    heads_fastest = default_order if heads_fastest is None else heads_fastest
    n_q_blocks = cdiv(n_q_heads, block_h)
    n_t_blocks = cdiv(seq_len, block_t)
    grid = (batch * n_t_blocks * (n_q_blocks + cdiv(n_k_heads, block_h)),)
    if k is None:  # the kernel never reads k when it has no k blocks; q stands in for the pointer
        k, k_out = q, q_out
    # Strides are read once per tensor (each read is a host round trip through the tensor API) and
    # serve both the kernel arguments and the int64 decision.
    q_st, k_st = q.stride(), k.stride()
    qo_st = q_st if q_out is q else q_out.stride()
    ko_st = k_st if k_out is k else k_out.stride()
    cs, ss = cos.stride(), sin.stride()
    if position_ids is not None:
        cos_strides, sin_strides = (0, *cs), (0, *ss)
        pos = position_ids
        pos_strides = (position_ids.stride(0) if position_ids.shape[0] > 1 else 0, position_ids.stride(1))
    else:
        cos_strides = (cs[0] if cos.shape[0] > 1 else 0, cs[1], cs[2])
        sin_strides = (ss[0] if sin.shape[0] > 1 else 0, ss[1], ss[2])
        pos, pos_strides = cos, (0, 0)
    slack = block_h * block_t
    # In place (outputs are the inputs) the outputs' reach is the inputs'.
    int64 = max(reach(q.shape, q_st, slack), reach(k.shape, k_st, slack),
                0 if q_out is q else reach(q_out.shape, qo_st, slack), 0 if k_out is k else reach(k_out.shape, ko_st, slack),
                reach(cos.shape, cs, slack), reach(sin.shape, ss, slack)) >= INT32_MAX
    with device_guard(q):
        rope_qk_kernel[grid](
            q, k, q_out, k_out, cos, sin, pos,
            seq_len, n_t_blocks, n_q_heads, n_k_heads, half, n_q_blocks,
            *q_st, *k_st, *qo_st, *ko_st,
            *cos_strides, *sin_strides, *pos_strides,
            INTERLEAVED=interleaved, TRANSPOSE=transpose, HAS_POSITIONS=position_ids is not None,
            BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_R=block_r, HEADS_FASTEST=heads_fastest, INT64_OFFSETS=int64,
            ROUND_BF16=interpreted and q_out.dtype == torch.bfloat16, num_warps=num_warps,
        )


def _rotate_into(x, out, cos, sin, position_ids, interleaved, transpose) -> None:
    """Reference path: out[...] = rotation of x (out may be x)."""
    out.copy_(rotate_reference(x, cos, sin, position_ids, interleaved, transpose))


def _rotate_qk_in_place(q, k, cos, sin, position_ids, interleaved, transpose) -> None:
    if q.numel() == 0 and k.numel() == 0:
        return
    path = op_path(q)
    if path == "reference":
        _rotate_into(q, q, cos, sin, position_ids, interleaved, transpose)
        _rotate_into(k, k, cos, sin, position_ids, interleaved, transpose)
        return
    _launch(q, k, q, k, cos, sin, position_ids, interleaved, transpose, interpreted=path == "interpreter")


def _rotate_qk_into(q, k, q_out, k_out, cos, sin, position_ids, interleaved, transpose) -> None:
    """q_out, k_out (new tensors of q's and k's shapes; k may be None) = the rotation of q, k."""
    if q.numel() == 0 and (k is None or k.numel() == 0):
        return
    path = op_path(q)
    if path == "reference":
        _rotate_into(q, q_out, cos, sin, position_ids, interleaved, transpose)
        if k is not None:
            _rotate_into(k, k_out, cos, sin, position_ids, interleaved, transpose)
        return
    rotary_dim = cos.shape[-1]
    if rotary_dim < q.shape[-1]:  # the kernel writes only the rotated lanes; carry the rest over
        q_out[..., rotary_dim:] = q[..., rotary_dim:]
        if k is not None:
            k_out[..., rotary_dim:] = k[..., rotary_dim:]
    _launch(q, k, q_out, k_out if k is not None else q_out, cos, sin, position_ids, interleaved, transpose,
            interpreted=path == "interpreter")


def _rotate_qk_new(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None,
                   interleaved: bool, transpose: bool) -> tuple[Tensor, Tensor]:
    """The out-of-place rotation: new tensors laid out like q and k. It is the forward of the
    autograd definition below (annotated so that torch.library.custom_op infers the op's schema)."""
    # empty_like keeps q's strides when q is dense (a transposed view stays one), as the fake does.
    q_out, k_out = output_like(q), output_like(k)
    _rotate_qk_into(q, k, q_out, k_out, cos, sin, position_ids, interleaved, transpose)
    return q_out, k_out


# The out-of-place rotation, defined once (ops/_autograd.py): the custom op fastkern::rope_qk that
# torch.compile traces, and the eager autograd.Function that eager calls take (a custom op's dispatch
# costs more host time than the launch: docs/rope.md, "Host time"). The rotation by theta is linear
# and orthogonal, so its backward is the same op with ``transpose`` flipped (rotation by -theta).
def _fake_rope_qk(q, k, cos, sin, position_ids, interleaved, transpose):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, position_ids, interleaved, transpose = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.interleaved, ctx.transpose = interleaved, transpose


def _backward(ctx, grad_q, grad_k):
    cos, sin, position_ids = ctx.saved_tensors
    # Into new tensors, never into grad_q / grad_k (see _rotate_grad).
    grad_q, grad_k = _rotate_back(grad_q, grad_k, cos, sin, position_ids, ctx.interleaved, not ctx.transpose)
    return grad_q, grad_k, None, None, None, None, None


_ROPE_QK = AutogradOp("rope_qk", _rotate_qk_new, fake=_fake_rope_qk, setup_context=_setup_context,
                      backward=_backward)
rope_qk_op = _ROPE_QK.op
RopeQKFunction = _ROPE_QK.function
# In the custom op's registered backward the gradient rotation is the custom op again (a traced
# backward holds the opaque op, and double backward works); in the eager Function's, a launch.
_rotate_back = backward_dispatch(rope_qk_op, _rotate_qk_new)


def _rotate_grad(grad: Tensor, cos, sin, position_ids, interleaved) -> Tensor:
    # Into a new tensor, never into `grad`: an incoming gradient can be the caller's own tensor
    # (torch.autograd.backward(outputs, grad_tensors)) or feed another branch of the graph, and the
    # kernel moves the same bytes either way.
    out = output_like(grad)
    _rotate_qk_into(grad, None, out, None, cos, sin, position_ids, interleaved, True)
    return out


class _RotateQInPlace(torch.autograd.Function):
    # Eager only (torch.compile traces rope_qk_op instead, see _rope_inplace): launches directly.
    @staticmethod
    def forward(ctx, q, k_alias, cos, sin, position_ids, interleaved):
        _rotate_qk_in_place(q, k_alias, cos, sin, position_ids, interleaved, False)
        ctx.mark_dirty(q)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.interleaved = interleaved
        return q

    @staticmethod
    def backward(ctx, grad_q):
        cos, sin, position_ids = ctx.saved_tensors
        return _rotate_grad(grad_q, cos, sin, position_ids, ctx.interleaved), None, None, None, None, None


class _MarkKRotated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, cos, sin, position_ids, interleaved):
        ctx.mark_dirty(k)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.interleaved = interleaved
        return k

    @staticmethod
    def backward(ctx, grad_k):
        cos, sin, position_ids = ctx.saved_tensors
        return _rotate_grad(grad_k, cos, sin, position_ids, ctx.interleaved), None, None, None, None


@functools.lru_cache(maxsize=1024)
def _dense_permutation(shape: tuple, strides: tuple):
    """(mem_shape, inverse) such that ``t.view(mem_shape).permute(inverse)`` of a contiguous t has
    exactly this shape and these strides, or None when no permutation of contiguous memory does.
    Cached: attention calls it twice per layer with the same few layouts."""
    perm = sorted(range(len(shape)), key=lambda i: (-strides[i], i))
    inverse = tuple(perm.index(i) for i in range(len(shape)))
    mem_shape = tuple(shape[i] for i in perm)
    # The view+permute result has the contiguous strides of mem_shape, permuted back: x must have
    # exactly those (on dims longer than 1), which also proves x dense. Checked by arithmetic.
    expected, step = [0] * len(shape), 1
    for i in reversed(perm):
        expected[i] = step
        step *= shape[i]
    if any(strides[i] != expected[i] for i in range(len(shape)) if shape[i] > 1):
        return None
    return mem_shape, inverse


def _base_and_rebuild(x: Tensor):
    """(base, rebuild) with rebuild(base) == x as view+permute ops, or None when x is not such a view."""
    base = x._base
    if base is None:
        base = x
    if not (base.is_contiguous() and base.numel() == x.numel() and base.storage_offset() == x.storage_offset()):
        return None
    layout = _dense_permutation(tuple(x.shape), x.stride())
    if layout is None:
        return None
    mem_shape, inverse = layout

    def rebuild(t: Tensor) -> Tensor:
        return t.view(mem_shape).permute(inverse)

    return base, rebuild


class _RotateBasesInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_base, k_base, q_view, k_view, cos, sin, position_ids, interleaved, rebuild_q, rebuild_k):
        # q_view/k_view are detached aliases of the bases with the layout the kernel addresses. This
        # Function only runs eagerly (not under torch.compile), so it launches directly instead of
        # through the custom op, whose dispatch costs more host time than the kernel at T=4096.
        _rotate_qk_in_place(q_view, k_view, cos, sin, position_ids, interleaved, False)
        ctx.mark_dirty(q_base, k_base)
        ctx.save_for_backward(cos, sin, position_ids)
        ctx.interleaved, ctx.rebuild = interleaved, (rebuild_q, rebuild_k)
        return q_base, k_base

    @staticmethod
    def backward(ctx, grad_q_base, grad_k_base):
        cos, sin, position_ids = ctx.saved_tensors
        # The incoming gradients are read as the bases' layout (a copy only if autograd hands over
        # another one) and rotated into new tensors: never into gradient storage we did not allocate
        # (see _rotate_grad).
        grad_q_base, grad_k_base = grad_q_base.contiguous(), grad_k_base.contiguous()
        out_q, out_k = output_like(grad_q_base), output_like(grad_k_base)
        rebuild_q, rebuild_k = ctx.rebuild
        _rotate_qk_into(rebuild_q(grad_q_base), rebuild_k(grad_k_base), rebuild_q(out_q), rebuild_k(out_k), cos, sin,
                        position_ids, ctx.interleaved, True)
        return out_q, out_k, None, None, None, None, None, None, None, None


def _runs(t: Tensor) -> tuple[Tensor, int]:
    """(start offsets in elements, length) of the runs of consecutive elements that make up t's memory."""
    shape, strides, run = list(t.shape), list(t.stride()), 1
    if shape and strides[-1] == 1:
        run = shape.pop()
        strides.pop()
    starts = torch.full((1,) * len(shape), t.storage_offset(), dtype=torch.int64, device=t.device)
    for dim, (n, st) in enumerate(zip(shape, strides)):
        view = [1] * len(shape)
        view[dim] = n
        starts = starts + torch.arange(n, dtype=torch.int64, device=t.device).view(view) * st
    return starts.reshape(-1), run


def _overlap(q: Tensor, k: Tensor) -> bool:
    """Whether an element of q and one of k (or two of either) share memory; q and k share a storage.

    Exact, and without cost in the usual case: q and k from separate projections live in separate
    storages and this is not called. Views of one fused qkv tensor interleave in memory without
    overlapping, so comparing address ranges is not enough: the runs of both are sorted and each
    must start after every earlier run ends (one sort of B*T*H offsets and a host sync).
    """
    if q.numel() == 0 or k.numel() == 0:
        return False
    spans = [(t.storage_offset(), t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))
             for t in (q, k)]
    if spans[0][1] < spans[1][0] or spans[1][1] < spans[0][0]:
        return False
    (qs, qn), (ks, kn) = _runs(q), _runs(k)
    starts = torch.cat([qs, ks])
    ends = torch.cat([qs + qn, ks + kn])
    order = torch.argsort(starts)
    starts, ends = starts[order], ends[order]
    return bool((starts[1:] < torch.cummax(ends[:-1], 0).values).any())


def _check_inplace_layout(q: Tensor, k: Tensor) -> None:
    """Reject layouts an in-place rotation cannot honour, before anything is written."""
    for name, t in (("q", q), ("k", k)):
        if torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f"{_OP}: `{name}` has elements that share memory (e.g. an expand()) and cannot be "
                             f"rotated in place; pass inplace=False")
    get_meta = getattr(torch._C._autograd, "_get_creation_meta", None)
    if get_meta is not None and torch.is_grad_enabled():
        default = torch._C._autograd.CreationMeta.DEFAULT
        for name, t in (("q", q), ("k", k)):
            # autograd refuses to record an in-place change of such views (its own error names neither
            # fastkern nor the fix); checked before the kernel runs, so q and k are left untouched.
            if t.requires_grad and t._is_view() and get_meta(t) != default:
                raise ValueError(
                    f"{_OP}: `{name}` is a view returned by split()/chunk()/unbind() (or made under no_grad), which "
                    f"autograd does not allow to be modified in place; pass inplace=False, or take q and k from "
                    f"the fused tensor by slicing (qkv[..., :n]) instead of split()")
    if q is k or (q.device == k.device and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
                  and _overlap(q, k)):
        raise ValueError(f"{_OP}: `q` and `k` share memory (the same tensor, or overlapping views of one); "
                         f"rotating them in place would rotate the shared elements twice. Pass inplace=False, or "
                         f"separate tensors")


def _rope_inplace(q, k, cos, sin, position_ids, interleaved):
    if torch.compiler.is_compiling():
        # Traced as the functional custom op (autograd registered on it, no mark_dirty for Dynamo to
        # handle); the copies give q and k the in-place semantics and are dropped from the graph when
        # nothing reads q or k afterwards. Reading q and k before writing also makes aliased q and k
        # come out right here, where the storage checks below cannot be traced.
        q_rot, k_rot = _ROPE_QK(q, k, cos, sin, position_ids, interleaved, False)
        q.copy_(q_rot)
        k.copy_(k_rot)
        return q_rot, k_rot
    _check_inplace_layout(q, k)
    fast = None
    fq, fk = _base_and_rebuild(q), _base_and_rebuild(k)
    if fq is not None and fk is not None and fq[0].data_ptr() != fk[0].data_ptr():
        fast = fq, fk
    if fast is None:
        q_rot = _RotateQInPlace.apply(q, k.detach(), cos, sin, position_ids, interleaved)
        k_rot = _MarkKRotated.apply(k, cos, sin, position_ids, interleaved)
        return q_rot, k_rot
    (q_base, rebuild_q), (k_base, rebuild_k) = fast
    q_base, k_base = _RotateBasesInPlace.apply(q_base, k_base, q.detach(), k.detach(), cos, sin, position_ids,
                                               interleaved, rebuild_q, rebuild_k)
    return rebuild_q(q_base), rebuild_k(k_base)


def check_tables(op: str, q: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None, rotary_dim: int | None,
                 batch: int, seq_len: int, head_dim: int) -> int:
    """Checks cos/sin (and position_ids) against q's batch, length and head_dim; returns rotary_dim.
    Shared by the ops that rotate (rope, rope_qk_norm)."""
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: `cos` {tuple(cos.shape)} and `sin` {tuple(sin.shape)} must have the same shape")
    if cos.dim() == 0:
        raise ValueError(f"{op}: `cos`/`sin` must be [B or 1, T, rotary_dim] or a table; got a scalar")
    rotary_dim = cos.shape[-1] if rotary_dim is None else int(rotary_dim)
    if rotary_dim != cos.shape[-1]:
        raise ValueError(f"{op}: `rotary_dim`={rotary_dim} but cos/sin have last dim {cos.shape[-1]}")
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"{op}: rotary_dim {rotary_dim} must be even and in (0, head_dim={head_dim}]")
    if position_ids is None:
        if cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len:
            raise ValueError(
                f"{op}: `cos`/`sin` must be [B or 1, T, rotary_dim] = [{batch} or 1, {seq_len}, {rotary_dim}]"
                f" without position_ids; got {tuple(cos.shape)}")
        return rotary_dim
    check_tensor(op, "position_ids", position_ids, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8))
    if cos.dim() != 2:
        raise ValueError(f"{op}: with position_ids, `cos`/`sin` must be a table [max_position, rotary_dim];"
                         f" got {tuple(cos.shape)}")
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != seq_len:
        raise ValueError(f"{op}: `position_ids` must be [B or 1, T] = [{batch} or 1, {seq_len}];"
                         f" got {tuple(position_ids.shape)}")
    if position_ids.device != q.device:
        raise ValueError(f"{op}: `position_ids` is on {position_ids.device} but `q` is on {q.device}")
    # A data-dependent check: one device sync, skipped while torch.compile traces.
    if not torch.compiler.is_compiling() and position_ids.numel():
        lo, hi = int(position_ids.min()), int(position_ids.max())
        if lo < 0 or hi >= cos.shape[0]:
            raise IndexError(f"{op}: position_ids span [{lo}, {hi}] but the cos/sin table has {cos.shape[0]} rows")
    return rotary_dim


def _check(q, k, cos, sin, position_ids, rotary_dim, inplace) -> int:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_tensor(_OP, name, t, dtypes=FLOAT_DTYPES)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{_OP}: `q` and `k` must be 4-D [B, H, T, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"{_OP}: `k` has dtype {k.dtype} but `q` has dtype {q.dtype}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{_OP}: `{name}` is on {t.device} but `q` is on {q.device}")
    (batch, n_q, seq_len, head_dim), (kb, n_k, kt, kd) = q.shape, k.shape
    if (kb, kt, kd) != (batch, seq_len, head_dim):
        raise ValueError(f"{_OP}: `q` {tuple(q.shape)} and `k` {tuple(k.shape)} must agree in B, T and D")
    if n_k == 0 or n_q % n_k != 0:
        raise ValueError(f"{_OP}: q's head count {n_q} must be a multiple of k's head count {n_k} (GQA)")
    rotary_dim = check_tables(_OP, q, cos, sin, position_ids, rotary_dim, batch, seq_len, head_dim)
    if inplace and torch.is_grad_enabled():
        for name, t in (("q", q), ("k", k)):
            base = t._base if t._base is not None else t
            if t.requires_grad and base.is_leaf:
                raise RuntimeError(f"{_OP}: `{name}` is (a view of) a leaf that requires grad and cannot be rotated in"
                                   f" place; pass inplace=False")
    return rotary_dim


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, position_ids: Tensor | None = None,
         interleaved: bool = False, rotary_dim: int | None = None, inplace: bool = True) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q and k in one kernel launch; returns (q_rot, k_rot).

    q: [B, Hq, T, D], k: [B, Hk, T, D], Hq a multiple of Hk, any strides (the transposed views of
    the projection outputs that attention modules produce are used as they are, never copied).
    cos/sin: as transformers' rotary embedding returns them, [B or 1, T, rotary_dim]; or, with
    ``position_ids`` [B or 1, T], a table [max_position, rotary_dim] indexed per token (packed
    documents whose positions restart need no per-token cos/sin). cos/sin receive no gradient.

    The result equals transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (half-split layout,
    cos = cat(f, f)); ``interleaved=True`` pairs elements (2i, 2i+1) (GPT-J layout, cos =
    repeat_interleave(f, 2)). ``rotary_dim`` (default cos.shape[-1]) < D rotates only the leading
    rotary_dim elements of each head and leaves the rest as they are. Math is fp32; fp64 runs the
    reference.

    ``inplace=True`` (default) writes into q and k and tells autograd so. q and k must not be leaves
    that require grad, must not share memory with each other (``rope(x, x)``, overlapping views:
    ValueError), and, when they require grad, must not be outputs of ``split()``/``chunk()``/
    ``unbind()`` (autograd forbids modifying those in place: ValueError; slice the fused tensor
    instead, or pass ``inplace=False``). Both forms' backward rotates the incoming gradients by
    -theta into new tensors.

    >>> import torch, fastkern
    >>> q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    >>> f = torch.outer(torch.arange(5.0), 0.5 ** torch.arange(4.0))
    >>> cos, sin = torch.cat([f, f], -1).cos()[None], torch.cat([f, f], -1).sin()[None]
    >>> q_rot, k_rot = fastkern.ops.rope(q, k, cos, sin, inplace=False)
    >>> half = torch.cat([-q[..., 4:], q[..., :4]], -1)
    >>> torch.allclose(q_rot, q * cos[:, None] + half * sin[:, None], atol=1e-6)
    True
    """
    _check(q, k, cos, sin, position_ids, rotary_dim, inplace)
    interleaved = bool(interleaved)
    if not inplace:
        return _ROPE_QK(q, k, cos, sin, position_ids, interleaved, False)
    return _rope_inplace(q, k, cos, sin, position_ids, interleaved)
