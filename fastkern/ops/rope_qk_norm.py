"""q_norm / k_norm (RMSNorm over head_dim) followed by the rotary embedding of q and k, fused.

Tiers: the Triton kernels in fastkern/kernels/rope_qk_norm.py (one launch forward, one backward plus
two small sums for the weight gradients), launched below; the forward defined once as (forward, fake,
setup_context, backward) and turned by ops/_autograd.py into the custom op ``fastkern::rope_qk_norm``
(what torch.compile traces) and the eager autograd.Function; the backward custom op
``fastkern::rope_qk_norm_backward``; and the public :func:`rope_qk_norm`.

Why: Qwen3 and Gemma3 attention norm q and k per head before rope, three passes over q and k (two
norms, one rotation) and three launches, each again in the recompute of a checkpointed layer and in
backward. Fused, q and k are read once and written once each way. Saved for backward: q and k
themselves (projection outputs, alive anyway) and one fp32 rstd per token and head.
"""

from __future__ import annotations

import functools
import numbers

import torch
from torch import Tensor

from ..reference.rope_qk_norm import norm_rotate_backward_reference, norm_rotate_reference
from ._autograd import AutogradOp, backward_dispatch
from ._common import FLOAT_DTYPES, INT32_MAX, cdiv, check_tensor, device_guard, op_path, output_buffer, reach
from .rope import check_tables

_OP = "fastkern.ops.rope_qk_norm"
# Weight-gradient split of the backward rows: (most programs, whole tiles per program); programs are row
# groups x head blocks. The GPU fills an H100's 132 SMs several times over with whole BLOCK_T-row tiles
# per program; the interpreter splits the rows anywhere (a ragged last range) into a few groups, which
# the CPU tests then exercise, and they also switch this to whole tiles.
_GPU_SPLIT = (1024, True)
_INTERPRETER_SPLIT = (8, False)
# (BLOCK_T, BLOCK_H) under the interpreter, None for its default (all heads, up to 32 tokens in one
# program: the interpreter pays per program). Tests set small blocks to run the GPU's tiling on CPU.
_INTERPRETER_BLOCKS: tuple[int, int] | None = None
_TILE_ELEMENTS = 4096


def _pow2(n: int) -> int:
    return max(1, 1 << (max(n, 1) - 1).bit_length())


@functools.lru_cache(maxsize=256)
def launch_config(n_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, forward warps, backward warps) on the GPU: about 4096 elements per program
    (Qwen3's D=128: 16 heads x 2 tokens, rope's measured best size in pairs, docs/rope.md); backward
    holds four live tiles (x, dout, g, xhat) and gets twice the warps. Not yet tuned on a GPU."""
    block_d = _pow2(head_dim)
    block_h = min(_pow2(n_heads), max(1, (_TILE_ELEMENTS // 2) // block_d))
    block_t = max(1, _TILE_ELEMENTS // (block_h * block_d))
    warps = 4 if block_t * block_h * block_d >= 2048 else 2
    return block_t, block_h, warps, 2 * warps


def _lanes(head_dim: int, rotary_dim: int) -> tuple[int, int]:
    # BLOCK_R lanes hold the R/2 pairs; BLOCK_TAIL lanes the D - R elements past rotary_dim (1 if none).
    return _pow2(rotary_dim // 2), _pow2(head_dim - rotary_dim)


def _table_strides(cos, sin, position_ids):
    """(cos strides, sin strides, position_ids strides, position_ids or a stand-in pointer) as the kernels read
    them: (batch, token, element), batch 0 where broadcast; table rows per token with position_ids."""
    cs, ss = cos.stride(), sin.stride()
    if position_ids is not None:
        ps = (position_ids.stride(0) if position_ids.shape[0] > 1 else 0, position_ids.stride(1))
        return (0, *cs), (0, *ss), ps, position_ids
    return ((cs[0] if cos.shape[0] > 1 else 0, cs[1], cs[2]), (ss[0] if sin.shape[0] > 1 else 0, ss[1], ss[2]),
            (0, 0), cos)


def _blocks(path: str, n_heads: int, head_dim: int, n_rows: int) -> tuple[int, int, int, int]:
    block_t, block_h, warps, back_warps = launch_config(n_heads, head_dim)
    if path == "interpreter":
        block_t, block_h = _INTERPRETER_BLOCKS or (min(32, _pow2(n_rows)), _pow2(n_heads))
    return block_t, block_h, warps, back_warps


def _int64(slack: int, *tensors: Tensor) -> bool:
    return max(reach(t.shape, t.stride(), slack) for t in tensors) >= INT32_MAX


def _dense(w: Tensor) -> Tensor:
    return w if w.stride(0) == 1 else w.contiguous()


def _rstd_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _forward(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
             position_ids: Tensor | None, eps: float, weight_offset: float, cast_before_weight: bool,
             interleaved: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q_out, k_out, q_rstd, k_rstd): outputs contiguous [B, T, H, D], rstd [B, T, H] (fp32; fp64 for fp64)."""
    path = op_path(q)
    if path == "reference" or q.numel() == 0 or k.numel() == 0:
        opts = (eps, weight_offset, cast_before_weight, position_ids, interleaved)
        q_out, q_rstd = norm_rotate_reference(q, q_weight, cos, sin, *opts)
        k_out, k_rstd = norm_rotate_reference(k, k_weight, cos, sin, *opts)
        return q_out, k_out, q_rstd.to(_rstd_dtype(q)), k_rstd.to(_rstd_dtype(k))
    from ..kernels.rope_qk_norm import rope_qk_norm_forward_kernel

    batch, seq_len, n_q, head_dim = q.shape
    n_k, rotary_dim, n_rows = k.shape[2], cos.shape[-1], batch * seq_len
    q_out, k_out = output_buffer(q.shape, q.dtype, q.device), output_buffer(k.shape, k.dtype, k.device)
    q_rstd = output_buffer(q.shape[:-1], torch.float32, q.device)
    k_rstd = output_buffer(k.shape[:-1], torch.float32, k.device)
    block_t, block_h, warps, _ = _blocks(path, max(n_q, n_k), head_dim, n_rows)
    block_r, block_tail = _lanes(head_dim, rotary_dim)
    n_q_blocks = cdiv(n_q, block_h)
    cos_s, sin_s, pos_s, pos = _table_strides(cos, sin, position_ids)
    grid = (cdiv(n_rows, block_t) * (n_q_blocks + cdiv(n_k, block_h)),)
    with device_guard(q):
        rope_qk_norm_forward_kernel[grid](
            q, k, _dense(q_weight), _dense(k_weight), q_out, k_out, q_rstd, k_rstd, cos, sin, pos,
            n_rows, seq_len, n_q, n_k, head_dim, rotary_dim // 2, n_q_blocks, float(eps), float(weight_offset),
            *q.stride(), *k.stride(), *cos_s, *sin_s, *pos_s,
            INTERLEAVED=interleaved, HAS_POSITIONS=position_ids is not None, HAS_TAIL=rotary_dim < head_dim,
            CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_R=block_r, BLOCK_TAIL=block_tail,
            INT64_OFFSETS=_int64(block_t * block_h, q, k, q_out, k_out, cos, sin),
            ROUND_BF16=path == "interpreter" and q.dtype == torch.bfloat16, num_warps=warps,
        )
    return q_out, k_out, q_rstd, k_rstd


def _backward_impl(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor,
                   q_rstd: Tensor, k_rstd: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None,
                   weight_offset: float, cast_before_weight: bool, interleaved: bool, need_weight_grad: bool):
    """(dq, dk, d q_weight, d k_weight); the weight gradients are None unless need_weight_grad."""
    path = op_path(q)
    if path == "reference" or q.numel() == 0 or k.numel() == 0:
        opts = (cos, sin, weight_offset, cast_before_weight, position_ids, interleaved, need_weight_grad)
        dq, dqw = norm_rotate_backward_reference(grad_q, q, q_weight, q_rstd, *opts)
        dk, dkw = norm_rotate_backward_reference(grad_k, k, k_weight, k_rstd, *opts)
        if need_weight_grad:  # a sum over no rows is 0 (and in the weight's dtype)
            dqw = dqw if q.numel() else torch.zeros_like(q_weight)
            dkw = dkw if k.numel() else torch.zeros_like(k_weight)
        return dq, dk, dqw, dkw
    from ..kernels.rope_qk_norm import rope_qk_norm_backward_kernel

    batch, seq_len, n_q, head_dim = q.shape
    n_k, rotary_dim, n_rows = k.shape[2], cos.shape[-1], batch * seq_len
    dq, dk = output_buffer(q.shape, q.dtype, q.device), output_buffer(k.shape, k.dtype, k.device)
    block_t, block_h, _, warps = _blocks(path, max(n_q, n_k), head_dim, n_rows)
    block_r, block_tail = _lanes(head_dim, rotary_dim)
    n_q_blocks = cdiv(n_q, block_h)
    n_blocks = n_q_blocks + cdiv(n_k, block_h)
    tiles = cdiv(n_rows, block_t)
    if need_weight_grad:
        max_programs, whole_tiles = _GPU_SPLIT if path == "triton" else _INTERPRETER_SPLIT
        groups = max(1, min(tiles if whole_tiles else n_rows, max_programs // n_blocks))
        rows_per_program = cdiv(tiles, groups) * block_t if whole_tiles else cdiv(n_rows, groups)
        groups = cdiv(n_rows, rows_per_program)
        partial = output_buffer((groups, n_blocks, head_dim), torch.float32, q.device)
    else:
        groups, rows_per_program, partial = tiles, block_t, q_rstd  # the kernel never touches partial then
    cos_s, sin_s, pos_s, pos = _table_strides(cos, sin, position_ids)
    with device_guard(q):
        rope_qk_norm_backward_kernel[(groups * n_blocks,)](
            grad_q, grad_k, q, k, _dense(q_weight), _dense(k_weight), q_rstd, k_rstd, dq, dk, partial, cos, sin, pos,
            n_rows, seq_len, rows_per_program, n_q, n_k, head_dim, rotary_dim // 2, n_q_blocks, float(weight_offset),
            *grad_q.stride(), *grad_k.stride(), *q.stride(), *k.stride(), *cos_s, *sin_s, *pos_s,
            INTERLEAVED=interleaved, HAS_POSITIONS=position_ids is not None, HAS_TAIL=rotary_dim < head_dim,
            HAS_WEIGHT_GRAD=need_weight_grad, CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_R=block_r,
            BLOCK_TAIL=block_tail,
            INT64_OFFSETS=_int64(block_t * block_h, grad_q, grad_k, q, k, dq, dk, cos, sin),
            ROUND_BF16=path == "interpreter" and q.dtype == torch.bfloat16, num_warps=warps,
        )
    if not need_weight_grad:
        return dq, dk, None, None
    # The tiny reduction: [groups, blocks, D] fp32 partials to one row per weight.
    return dq, dk, partial[:, :n_q_blocks].sum((0, 1)).to(q_weight.dtype), partial[:, n_q_blocks:].sum((0, 1)).to(
        k_weight.dtype)


@torch.library.custom_op("fastkern::rope_qk_norm_backward", mutates_args=())
def rope_qk_norm_backward_op(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor,
                             q_rstd: Tensor, k_rstd: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None,
                             weight_offset: float, cast_before_weight: bool, interleaved: bool,
                             need_weight_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dqw, dkw = _backward_impl(grad_q, grad_k, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, position_ids,
                                      weight_offset, cast_before_weight, interleaved, need_weight_grad)
    return (dq, dk, dqw if dqw is not None else q_weight.new_zeros(q_weight.shape),
            dkw if dkw is not None else k_weight.new_zeros(k_weight.shape))


@rope_qk_norm_backward_op.register_fake
def _(grad_q, grad_k, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, position_ids, weight_offset,
      cast_before_weight, interleaved, need_weight_grad):
    return q.new_empty(q.shape), k.new_empty(k.shape), q_weight.new_empty(q_weight.shape), k_weight.new_empty(
        k_weight.shape)


_rope_qk_norm_backward = backward_dispatch(rope_qk_norm_backward_op, _backward_impl)


def _fake_forward(q, k, q_weight, k_weight, cos, sin, position_ids, eps, weight_offset, cast_before_weight,
                  interleaved):
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(q.shape[:-1], dtype=_rstd_dtype(q)),
            k.new_empty(k.shape[:-1], dtype=_rstd_dtype(k)))


def _setup_context(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, position_ids, eps, weight_offset, cast_before_weight, interleaved = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, output[2], output[3], cos, sin, position_ids)
    ctx.opts = (weight_offset, cast_before_weight, interleaved)


def _backward(ctx, grad_q_out, grad_k_out):
    q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, position_ids = ctx.saved_tensors
    # An output that received no gradient contributes none (autograd may hand over None for it).
    grad_q_out = grad_q_out if grad_q_out is not None else torch.zeros_like(q)
    grad_k_out = grad_k_out if grad_k_out is not None else torch.zeros_like(k)
    need = ctx.needs_input_grad
    dq, dk, dqw, dkw = _rope_qk_norm_backward(grad_q_out, grad_k_out, q, k, q_weight, k_weight, q_rstd, k_rstd, cos,
                                              sin, position_ids, *ctx.opts, need[2] or need[3])
    return (dq if need[0] else None, dk if need[1] else None, dqw if need[2] else None, dkw if need[3] else None,
            None, None, None, None, None, None, None)


# One definition (ops/_autograd.py): fastkern::rope_qk_norm returns (q_out, k_out, q_rstd, k_rstd) for
# torch.compile, the rstd marked non-differentiable; the eager Function returns (q_out, k_out).
_ROPE_QK_NORM = AutogradOp("rope_qk_norm", _forward, fake=_fake_forward, setup_context=_setup_context,
                           backward=_backward, aux_outputs=2)
rope_qk_norm_op = _ROPE_QK_NORM.op
RopeQkNormFunction = _ROPE_QK_NORM.function


def _check(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, position_ids, rotary_dim) -> None:
    for name, t in (("q", q), ("k", k), ("q_weight", q_weight), ("k_weight", k_weight), ("cos", cos), ("sin", sin)):
        check_tensor(_OP, name, t, dtypes=FLOAT_DTYPES)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{_OP}: `q` and `k` must be 4-D [B, T, H, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"{_OP}: `k` has dtype {k.dtype} but `q` has dtype {q.dtype}")
    for name, t in (("k", k), ("q_weight", q_weight), ("k_weight", k_weight), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{_OP}: `{name}` is on {t.device} but `q` is on {q.device}")
    (batch, seq_len, _, head_dim), (kb, kt, _, kd) = q.shape, k.shape
    if (kb, kt, kd) != (batch, seq_len, head_dim):
        raise ValueError(f"{_OP}: `q` {tuple(q.shape)} and `k` {tuple(k.shape)} must agree in B, T and D")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (head_dim,):
            raise ValueError(f"{_OP}: `{name}` must have shape [{head_dim}] (head_dim); got {tuple(w.shape)}")
    for name, value in (("eps", eps), ("weight_offset", weight_offset)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{_OP}: `{name}` must be a real number, got {type(value).__name__}")
    if eps < 0:
        raise ValueError(f"{_OP}: `eps` must be >= 0, got {eps}")
    check_tables(_OP, q, cos, sin, position_ids, rotary_dim, batch, seq_len, head_dim)


def rope_qk_norm(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                 eps: float = 1e-6, *, weight_offset: float = 0.0, cast_before_weight: bool = True,
                 position_ids: Tensor | None = None, interleaved: bool = False,
                 rotary_dim: int | None = None) -> tuple[Tensor, Tensor]:
    """RMSNorm of each head of q and k over head_dim, then their rotary embedding; returns (q_out, k_out).

    What Qwen3 / Gemma3 attention computes as ``apply_rotary_pos_emb(q_norm(q).transpose(1, 2),
    k_norm(k).transpose(1, 2), cos, sin)``, in one kernel launch (backward: one more, plus the sum of
    the weight gradients' per-program partials). q: [B, T, Hq, D], k: [B, T, Hk, D], the per-head views
    of the projection outputs before their transpose, any strides (slices of a fused qkv projection are
    read in place). Returns new contiguous [B, T, H, D] tensors of q's dtype; the caller transposes them
    to [B, H, T, D] for attention as before.

    Norm: rstd = 1 / sqrt(mean(x^2) + eps) per token and head, in fp32; ``weight_offset`` 0 is the
    llama form (Qwen3), 1 the gemma form (Gemma3: weight applied as 1 + weight). With
    ``cast_before_weight=True`` (the llama form) x * rstd is rounded to q's dtype before the weight
    multiply, as LlamaRMSNorm and :func:`fastkern.ops.rms_norm` do; otherwise the product is taken in
    fp32. The normalised value then stays fp32 through the rotation and is rounded once, at the end
    (docs/rope_qk_norm.md).
    q_weight, k_weight: [D], any float dtype, differentiable; their gradients are computed only when
    they require grad (frozen norms under LoRA skip the reduction).

    Rotation: as :func:`fastkern.ops.rope`: cos/sin [B or 1, T, rotary_dim], or a table
    [max_position, rotary_dim] read at ``position_ids`` [B or 1, T]; half-split pairs (i, i + R/2) or,
    with ``interleaved``, (2i, 2i+1); ``rotary_dim`` (default cos.shape[-1]) < D rotates the leading
    rotary_dim elements only. cos/sin receive no gradient.

    Backward saves q, k and one fp32 rstd per token and head.

    >>> import torch, fastkern
    >>> q, k = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 2, 8)
    >>> wq, wk = torch.rand(8), torch.rand(8)
    >>> f = torch.outer(torch.arange(5.0), 0.5 ** torch.arange(4.0))
    >>> cos, sin = torch.cat([f, f], -1).cos()[None], torch.cat([f, f], -1).sin()[None]
    >>> q_out, k_out = fastkern.ops.rope_qk_norm(q, k, wq, wk, cos, sin)
    >>> qn = fastkern.ops.rms_norm(q, wq).transpose(1, 2)
    >>> want, _ = fastkern.ops.rope(qn, qn[:, :2], cos, sin, inplace=False)
    >>> torch.allclose(q_out.transpose(1, 2), want, atol=1e-5)
    True
    """
    _check(q, k, q_weight, k_weight, cos, sin, eps, weight_offset, position_ids, rotary_dim)
    return _ROPE_QK_NORM(q, k, q_weight, k_weight, cos, sin, position_ids, float(eps), float(weight_offset),
                         bool(cast_before_weight), bool(interleaved))
