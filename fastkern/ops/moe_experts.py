"""Routed gated experts of an MoE layer through grouped GEMMs: ``moe_experts``.

out[t] = sum_k w[t, k] * (down[e] @ act(gate[e] @ x[t] + bg[e], up[e] @ x[t] + bu[e]) + bd[e]),
e = top_k_index[t, k], with the experts' weights stacked as transformers 5 stores them: gate_up
[E, 2I, H] and down [E, H, I] (any strides: gpt-oss's [E, H, 2I] / [E, I, H] weights are passed as
their transposes), the gate and up rows of gate_up concatenated (gate rows first: mixtral, qwen2_moe,
qwen3_moe) or ``interleaved`` (gate row 2j, up row 2j + 1: gpt-oss), optional biases gate_up_bias
[E, 2I] (same order) and down_bias [E, H]. act is silu(gate) * up, or gpt-oss's clamped SwiGLU
``min(gate, limit) * sigmoid(alpha * min(gate, limit)) * (clamp(up, -limit, limit) + 1)``.
Differentiable in x, the routing weights, gate_up, down and the biases.

Path: the (token, expert) pairs are sorted by expert once per call (``_routing``, device ops only, no
host sync), then one launch over all experts computes gate and up (bias added) with the activation in
its epilogue (fastkern/kernels/moe_experts.py), one launch the down projection (bias added) scaled by
the routing weight, and one the sum over the top-k. Backward is four launches: the down projection's
input gradient with the routing-weight gradient and the activation's backward in its epilogue, the
gate_up input gradient, and one per-expert weight-gradient launch for each weight, which also sums the
bias gradient. Saved for backward: gate and up per pair ([N * K, 2I], bias included); h is recomputed
from them.

Fused epilogue rather than a grouped GEMM followed by fastkern's GLU kernel: the GLU would read gate
and up back from memory and write h once more ([N * K, 3I] of extra traffic per layer and step), and
the backward's activation can ride on the down projection's input-gradient GEMM, whose output tile is
exactly the d(h) tile it needs.

Dispatch per call like the other ops (fastkern.runtime.path_for): the Triton kernels on CUDA, the same
kernels under the interpreter on CPU with TRITON_INTERPRET=1, else fastkern/reference/moe_experts.py;
float64 always takes the reference. Custom ops ``fastkern::moe_experts_forward`` / ``_backward`` with
fake implementations let torch.compile trace it.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from ..reference.moe_experts import moe_experts_backward_reference, moe_experts_forward_reference
from ._common import (FLOAT_DTYPES, INT32_MAX, cdiv, check_like, check_tensor, device_guard, op_path, output_buffer,
                      output_like)

_OP = "fastkern.ops.moe_experts"
ACTIVATIONS = ("silu", "clamped_swiglu")


def _tiles(path: str, device: torch.device) -> dict:
    """Tile sizes: BM pairs per block (shared by every per-pair launch: the routing pads each expert's run
    to it), BN_GU gate (and as many up) columns of moe_gate_up_kernel, BN_ROWS output columns of
    grouped_rows_kernel, BN_DB columns of I in moe_down_backward_kernel, BK the reduction step, BR x BC
    the weight-gradient tile over BM_W pairs per step.

    GPU values: the best per kernel of a sweep of eight configurations on an H100 (2026-12-07, bf16, 8K
    tokens; Qwen3-30B-A3B, Mixtral-8x7B and gpt-oss-20b layer shapes; docs/families.md): against the
    first choice (BM 64, BN 64 / 128, BR x BC 128 x 64, 3 stages) the layer's kernels went 10.9 -> 9.5,
    87.7 -> 65.7 and 130 -> 72 ms with BM 128, BN_GU 128, BR x BC 256 x 128, 4 stages, and
    grouped_rows_kernel gained another ~40% from 256 output columns, which made the down-backward
    kernel (whose columns are I) slower, hence its own BN_DB. The interpreter gets small tiles, since its
    cost grows with the work of masked lanes. These tiles need up to 192 KiB of shared memory per program
    (4 stages of 256 x 64 and 64 x 128 bf16 operands); a GPU that offers less gets the smaller first choice."""
    if path == "interpreter":
        return dict(BM=16, BN_GU=16, BN_ROWS=32, BN_DB=32, BK=16, BR=32, BC=32, BM_W=16, warps=4, stages=1)
    if _shared_memory_per_block(device) >= 200 * 1024:
        return dict(BM=128, BN_GU=128, BN_ROWS=256, BN_DB=128, BK=64, BR=256, BC=128, BM_W=64, warps=8, stages=4)
    return dict(BM=64, BN_GU=64, BN_ROWS=128, BN_DB=128, BK=64, BR=128, BC=64, BM_W=32, warps=8, stages=3)


@functools.cache
def _shared_memory_per_block(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 0)


def _routing(top_k_index: Tensor, n_experts: int, block_m: int):
    """Pairs s = t * K + k sorted by expert, each expert's run padded to a multiple of block_m.

    Returns (pair_ids [n_blocks * block_m] int32 with -1 in the padding, block_expert [n_blocks] int32
    with -1 for unused blocks, seg_start [E] int32, counts [E] int32). n_blocks is the bound
    cdiv(S, block_m) + E, so nothing here waits for the device. Ids outside [0, E) go to no expert.
    """
    ids = top_k_index.reshape(-1).long()
    s_total = ids.numel()
    dev = ids.device
    key = torch.where((ids >= 0) & (ids < n_experts), ids, n_experts)
    counts_all = torch.zeros(n_experts + 1, dtype=torch.int64, device=dev)
    counts_all.scatter_add_(0, key, torch.ones_like(key))
    counts = counts_all[:n_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    seg_end = torch.cumsum(padded, 0)
    seg_start = seg_end - padded
    n_blocks = cdiv(s_total, block_m) + n_experts
    slots = n_blocks * block_m
    sorted_key, order = torch.sort(key, stable=True)
    compact_start = torch.cumsum(counts_all, 0) - counts_all
    rank = torch.arange(s_total, device=dev) - compact_start[sorted_key]
    # Pairs routed to no expert land in one dump slot past the end, cut off below.
    start_ext = torch.cat([seg_start, torch.full((1,), slots, dtype=torch.int64, device=dev)])
    dest = torch.where(sorted_key < n_experts, start_ext[sorted_key] + rank, slots)
    pair_ids = torch.full((slots + 1,), -1, dtype=torch.int64, device=dev)
    pair_ids.scatter_(0, dest, order)
    block_start = torch.arange(n_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(seg_end, block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1)
    return (pair_ids[:slots].to(torch.int32), block_expert.to(torch.int32), seg_start.to(torch.int32),
            counts.to(torch.int32))


def _round_bf16(t: Tensor, path: str) -> bool:
    return path == "interpreter" and t.dtype == torch.bfloat16


def _gu_layout(interleaved: bool, inter: int) -> tuple[int, int]:
    """(step between gate columns, offset of a gate column's up column) in [.., 2I], the weights' order."""
    return (2, 1) if interleaved else (1, inter)


def _strides(t: Tensor | None, n: int) -> tuple[int, ...]:
    return (0,) * n if t is None else tuple(t.stride())


def _combine(y: Tensor, ids: Tensor, n: int, k: int, n_experts: int, dtype, tiles, round_bf16) -> Tensor:
    from ..kernels.moe_experts import moe_combine_kernel

    h = y.shape[1]
    out = output_buffer((n, h), dtype, y.device)
    block_h = min(1024, max(16, 1 << (h - 1).bit_length()))
    moe_combine_kernel[(n, cdiv(h, block_h))](
        y, ids, out, h, k, n_experts, y.stride(0), out.stride(0), out.stride(1),
        BLOCK_H=block_h, ROUND_BF16=round_bf16, num_warps=4)
    return out


def _forward_kernels(x, ids, tw, gate_up, down, gub, db, act, path):
    from ..kernels.moe_experts import grouped_rows_kernel, moe_gate_up_kernel

    interleaved, clamped, alpha, limit = act
    n, k = ids.shape
    n_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    step, up = _gu_layout(interleaved, inter)
    s_total = n * k
    t = _tiles(path, x.device)
    rb = _round_bf16(x, path)
    pair_ids, block_expert, _, _ = _routing(ids, n_experts, t["BM"])
    n_blocks = block_expert.numel()
    gu = output_buffer((s_total, two_i), x.dtype, x.device)
    h = output_buffer((s_total, inter), x.dtype, x.device)
    gb_e, gb_c = _strides(gub, 2)
    moe_gate_up_kernel[(n_blocks, cdiv(inter, t["BN_GU"]))](
        x, gate_up, gub if gub is not None else gate_up, pair_ids, block_expert, gu, h, inter, hidden, k,
        up * gate_up.stride(1), up * gb_c, step, up, alpha, limit,
        x.stride(0), x.stride(1), gate_up.stride(0), step * gate_up.stride(1), gate_up.stride(2), gb_e, step * gb_c,
        gu.stride(0), h.stride(0),
        HAS_BIAS=gub is not None, CLAMPED=clamped, BLOCK_M=t["BM"], BLOCK_N=t["BN_GU"], BLOCK_K=t["BK"],
        ROUND_BF16=rb, num_warps=t["warps"], num_stages=t["stages"])
    y = output_buffer((s_total, hidden), x.dtype, x.device)
    grouped_rows_kernel[(n_blocks, cdiv(hidden, t["BN_ROWS"]))](
        h, down, db if db is not None else down, pair_ids, block_expert, tw, y, hidden, inter,
        h.stride(0), down.stride(0), down.stride(2), down.stride(1), *_strides(db, 2), y.stride(0),
        HAS_BIAS=db is not None, HAS_SCALE=True, BLOCK_M=t["BM"], BLOCK_N=t["BN_ROWS"], BLOCK_K=t["BK"], ROUND_BF16=rb,
        num_warps=t["warps"], num_stages=t["stages"])
    del h
    out = _combine(y, ids, n, k, n_experts, x.dtype, t, rb)
    return out, gu


def _weight_grad(l, r, tw, routing, like_w, like_b, need_w, need_b, dims, n_experts, k, r_up, act, flags, t, rb):
    """One expert_weight_grad_kernel launch: (d weight or None, d bias or None)."""
    from ..kernels.moe_experts import expert_weight_grad_kernel

    pair_ids, seg_start, counts = routing
    (l_rows, l_cols), (r_rows, r_cols) = l, r
    r_dim, c_dim = dims
    dw = output_like(like_w) if need_w else None
    dbias = output_like(like_b) if need_b else None
    n_c = cdiv(c_dim, t["BC"]) if need_w else 1
    expert_weight_grad_kernel[(n_experts, cdiv(r_dim, t["BR"]) * n_c)](
        l_rows, r_rows, tw, pair_ids, seg_start, counts, dw if need_w else dbias, dbias if need_b else dw,
        r_dim, c_dim, k, r_up, act[2], act[3],
        l_rows.stride(0), l_cols, r_rows.stride(0), r_cols, *_strides(dw, 3), *_strides(dbias, 2),
        **flags, CLAMPED=act[1], COMPUTE_DW=need_w, HAS_LSUM=need_b,
        BLOCK_R=t["BR"], BLOCK_C=t["BC"], BLOCK_M=t["BM_W"], ROUND_BF16=rb,
        num_warps=t["warps"], num_stages=t["stages"])
    return dw, dbias


def _backward_kernels(grad_out, x, ids, tw, gate_up, down, gu, gub, db, act, path, need):
    from ..kernels.moe_experts import grouped_rows_kernel, moe_down_backward_kernel

    interleaved, clamped, alpha, limit = act
    n, k = ids.shape
    n_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    step, up = _gu_layout(interleaved, inter)
    s_total = n * k
    t = _tiles(path, x.device)
    rb = _round_bf16(x, path)
    pair_ids, block_expert, seg_start, counts = _routing(ids, n_experts, t["BM"])
    n_blocks = block_expert.numel()
    n_tiles_i = cdiv(inter, t["BN_DB"])
    dgu = output_buffer((s_total, two_i), x.dtype, x.device)
    # Zero-filled: pairs routed to no expert are never written and get a zero routing-weight gradient.
    dw_part = torch.zeros(s_total, n_tiles_i, dtype=torch.float32, device=x.device)
    moe_down_backward_kernel[(n_blocks, n_tiles_i)](
        grad_out, down, db if db is not None else down, pair_ids, block_expert, tw, gu, dgu, dw_part,
        inter, hidden, k, n_tiles_i, step, up, alpha, limit,
        grad_out.stride(0), grad_out.stride(1), down.stride(0), down.stride(1), down.stride(2), *_strides(db, 2),
        gu.stride(0), dgu.stride(0),
        HAS_BIAS=db is not None, CLAMPED=clamped, BLOCK_M=t["BM"], BLOCK_N=t["BN_DB"], BLOCK_K=t["BK"], ROUND_BF16=rb,
        num_warps=t["warps"], num_stages=t["stages"])
    dtw = dw_part.sum(1).view(n, k).to(tw.dtype)
    dx_pairs = output_buffer((s_total, hidden), x.dtype, x.device)
    grouped_rows_kernel[(n_blocks, cdiv(hidden, t["BN_ROWS"]))](
        dgu, gate_up, gate_up, pair_ids, block_expert, tw, dx_pairs, hidden, two_i,
        dgu.stride(0), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), 0, 0, dx_pairs.stride(0),
        HAS_BIAS=False, HAS_SCALE=False, BLOCK_M=t["BM"], BLOCK_N=t["BN_ROWS"], BLOCK_K=t["BK"], ROUND_BF16=rb,
        num_warps=t["warps"], num_stages=t["stages"])
    dx = _combine(dx_pairs, ids, n, k, n_experts, x.dtype, t, rb)
    del dx_pairs
    routing = (pair_ids, seg_start, counts)
    d_gate_up = d_gub = d_down = d_db = None
    need_gub, need_db = need[2] and gub is not None, need[3] and db is not None
    if need[0] or need_gub:
        # d gate_up[e] [2I, H] = sum over pairs of d(gate_up)[s] x[t]^T; d gate_up_bias[e] = sum of d(gate_up)[s].
        d_gate_up, d_gub = _weight_grad(
            (dgu, dgu.stride(1)), (x, x.stride(1)), tw, routing, gate_up, gub, need[0], need_gub,
            (two_i, hidden), n_experts, k, 0, act,
            dict(L_BY_TOKEN=False, L_SCALED=False, R_BY_TOKEN=True, R_GLU=False), t, rb)
    if need[1] or need_db:
        # d down[e] [H, I] = sum over pairs of w[s] dout[t] h[s]^T (h recomputed from gate, up);
        # d down_bias[e] = sum of w[s] dout[t].
        d_down, d_db = _weight_grad(
            (grad_out, grad_out.stride(1)), (gu, step * gu.stride(1)), tw, routing, down, db, need[1], need_db,
            (hidden, inter), n_experts, k, up * gu.stride(1), act,
            dict(L_BY_TOKEN=True, L_SCALED=True, R_BY_TOKEN=False, R_GLU=True), t, rb)
    return dx, dtw, d_gate_up, d_down, d_gub, d_db


def _empty_grad(bias: Tensor | None, x: Tensor) -> Tensor:
    # The custom op returns tensors only: a bias that is None gets an empty gradient placeholder.
    return x.new_empty(0) if bias is None else torch.zeros_like(bias)


def _forward_impl(x, ids, tw, gate_up, down, gub, db, act) -> tuple[Tensor, Tensor]:
    n, k = ids.shape
    if n == 0 or k == 0 or gate_up.shape[0] == 0:
        return (torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device),
                torch.zeros(n * k, gate_up.shape[1], dtype=x.dtype, device=x.device))
    path = op_path(x)
    if path == "reference":
        return moe_experts_forward_reference(x, ids, tw, gate_up, down, gub, db, *act)
    ids, tw = ids.contiguous(), tw.contiguous()
    with device_guard(x):
        return _forward_kernels(x, ids, tw, gate_up, down, gub, db, act, path)


def _backward_impl(grad_out, x, ids, tw, gate_up, down, gu, gub, db, act, need=(True,) * 4):
    """need: whether d gate_up, d down, d gate_up_bias, d down_bias are wanted (the ones not wanted come
    back as zeros, or as empty placeholders for absent biases)."""
    n, k = ids.shape
    if n == 0 or k == 0 or gate_up.shape[0] == 0:
        return (torch.zeros_like(x, memory_format=torch.contiguous_format), torch.zeros_like(tw),
                torch.zeros_like(gate_up), torch.zeros_like(down), _empty_grad(gub, x), _empty_grad(db, x))
    grad_out = grad_out.to(x.dtype)
    path = op_path(x)
    if path == "reference":
        grads = moe_experts_backward_reference(grad_out, x, ids, tw, gate_up, down, gu, gub, db, *act)
    else:
        ids, tw, gu = ids.contiguous(), tw.contiguous(), gu.contiguous()
        with device_guard(x):
            grads = _backward_kernels(grad_out, x, ids, tw, gate_up, down, gu, gub, db, act, path, need)
    dx, dtw, dgu, dd, dgub, ddb = grads
    return (dx, dtw, dgu if dgu is not None else torch.zeros_like(gate_up),
            dd if dd is not None else torch.zeros_like(down),
            dgub if dgub is not None else _empty_grad(gub, x), ddb if ddb is not None else _empty_grad(db, x))


@torch.library.custom_op("fastkern::moe_experts_forward", mutates_args=())
def moe_experts_forward_op(x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor,
                           down: Tensor, gate_up_bias: Optional[Tensor] = None, down_bias: Optional[Tensor] = None,
                           interleaved: bool = False, clamped: bool = False, alpha: float = 1.0,
                           limit: float = 0.0) -> tuple[Tensor, Tensor]:
    return _forward_impl(x, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias,
                         (interleaved, clamped, alpha, limit))


@moe_experts_forward_op.register_fake
def _(x, top_k_index, top_k_weights, gate_up, down, gate_up_bias=None, down_bias=None, interleaved=False,
      clamped=False, alpha=1.0, limit=0.0):
    n, k = top_k_index.shape
    return (x.new_empty(n, x.shape[1]), x.new_empty(n * k, gate_up.shape[1]))


@torch.library.custom_op("fastkern::moe_experts_backward", mutates_args=())
def moe_experts_backward_op(grad_out: Tensor, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                            gate_up: Tensor, down: Tensor, gate_up_out: Tensor,
                            gate_up_bias: Optional[Tensor] = None, down_bias: Optional[Tensor] = None,
                            interleaved: bool = False, clamped: bool = False, alpha: float = 1.0,
                            limit: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d x, d top_k_weights, d gate_up, d down, d gate_up_bias, d down_bias); a bias that is None gets an
    empty tensor."""
    return _backward_impl(grad_out, x, top_k_index, top_k_weights, gate_up, down, gate_up_out, gate_up_bias,
                          down_bias, (interleaved, clamped, alpha, limit))


@moe_experts_backward_op.register_fake
def _(grad_out, x, top_k_index, top_k_weights, gate_up, down, gate_up_out, gate_up_bias=None, down_bias=None,
      interleaved=False, clamped=False, alpha=1.0, limit=0.0):
    # The weight and bias gradients take their tensor's strides (output_like, zeros_like).
    return (x.new_empty(x.shape), top_k_weights.new_empty(top_k_weights.shape),
            torch.empty_like(gate_up), torch.empty_like(down),
            x.new_empty(0) if gate_up_bias is None else torch.empty_like(gate_up_bias),
            x.new_empty(0) if down_bias is None else torch.empty_like(down_bias))


def _grads_for(need, dx, dtw, dgu, dd, dgub, ddb):
    """The autograd return tuple for inputs (x, ids, tw, gate_up, down, gub, db, 4 scalars)."""
    grads = (dx, None, dtw, dgu, dd, dgub, ddb)
    return tuple(g if i < len(need) and need[i] else None for i, g in enumerate(grads)) + (None,) * 4


def _setup_context(ctx, inputs, output):
    x, ids, tw, gate_up, down, gub, db, *act = inputs
    ctx.save_for_backward(x, ids, tw, gate_up, down, output[1], gub, db)
    ctx.act = tuple(act)
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx, grad_out, _grad_gu):
    x, ids, tw, gate_up, down, gu, gub, db = ctx.saved_tensors
    grads = moe_experts_backward_op(grad_out, x, ids, tw, gate_up, down, gu, gub, db, *ctx.act)
    return _grads_for(ctx.needs_input_grad, *grads)


moe_experts_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


class MoEExpertsFunction(torch.autograd.Function):
    """Eager autograd for the same math, calling the implementations directly (no custom-op wrapper
    cost per call) and skipping the weight- and bias-gradient launches for frozen experts."""

    @staticmethod
    def forward(ctx, x, ids, tw, gate_up, down, gub, db, interleaved, clamped, alpha, limit):
        act = (interleaved, clamped, alpha, limit)
        out, gu = _forward_impl(x, ids, tw, gate_up, down, gub, db, act)
        ctx.save_for_backward(x, ids, tw, gate_up, down, gu, gub, db)
        ctx.act = act
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, ids, tw, gate_up, down, gu, gub, db = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _backward_impl(grad_out, x, ids, tw, gate_up, down, gu, gub, db, ctx.act,
                               (need[3], need[4], need[5], need[6]))
        return _grads_for(need, *grads)


def _activation(activation: str, alpha, limit) -> tuple[bool, float, float]:
    """(clamped, alpha, limit) for the kernels; errors for a combination they do not compute."""
    if activation == "silu":
        if alpha is not None or limit is not None:
            raise ValueError(f"{_OP}: alpha and limit belong to activation='clamped_swiglu'; silu takes neither")
        return False, 1.0, 0.0
    if activation == "clamped_swiglu":
        if alpha is None or limit is None:
            raise ValueError(f"{_OP}: activation='clamped_swiglu' needs alpha and limit (gpt-oss: 1.702 and 7.0)")
        try:
            alpha, limit = float(alpha), float(limit)
        except (TypeError, ValueError):
            raise TypeError(f"{_OP}: alpha and limit must be numbers, got {alpha!r} and {limit!r}") from None
        if not (math.isfinite(alpha) and math.isfinite(limit) and limit >= 0):
            raise ValueError(f"{_OP}: clamped_swiglu needs a finite alpha and a finite limit >= 0; got alpha={alpha}, "
                             f"limit={limit}")
        return True, alpha, limit
    raise ValueError(f"{_OP}: activation {activation!r} is not one of {ACTIVATIONS}")


def _check(x, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, interleaved) -> None:
    check_tensor(_OP, "hidden_states", x, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "gate_up", gate_up, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "down", down, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "top_k_weights", top_k_weights, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "top_k_index", top_k_index, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
    check_like(_OP, "hidden_states", x, "gate_up", gate_up, shape=False)
    check_like(_OP, "hidden_states", x, "down", down, shape=False)
    if not isinstance(interleaved, bool):
        raise TypeError(f"{_OP}: `interleaved` must be a bool, got {type(interleaved).__name__}")
    for name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if t.device != x.device:
            raise ValueError(f"{_OP}: `{name}` is on {t.device} but `hidden_states` is on {x.device}")
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3 or top_k_index.dim() != 2:
        raise ValueError(f"{_OP}: expected hidden_states [N, H], top_k_index [N, K], gate_up [E, 2I, H], down "
                         f"[E, H, I]; got {tuple(x.shape)}, {tuple(top_k_index.shape)}, {tuple(gate_up.shape)}, "
                         f"{tuple(down.shape)}")
    n, hidden = x.shape
    e, two_i, h2 = gate_up.shape
    if two_i % 2 or h2 != hidden or tuple(down.shape) != (e, hidden, two_i // 2):
        raise ValueError(f"{_OP}: gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not fit "
                         f"[E, 2I, H] / [E, H, I] with H = {hidden}")
    for name, bias, shape in (("gate_up_bias", gate_up_bias, (e, two_i)), ("down_bias", down_bias, (e, hidden))):
        if bias is None:
            continue
        check_tensor(_OP, name, bias, dtypes=FLOAT_DTYPES)
        check_like(_OP, "hidden_states", x, name, bias, shape=False)
        if tuple(bias.shape) != shape:
            raise ValueError(f"{_OP}: `{name}` has shape {tuple(bias.shape)}; expected {list(shape)} for gate_up "
                             f"{tuple(gate_up.shape)}")
    if top_k_index.shape[0] != n or top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"{_OP}: top_k_index {tuple(top_k_index.shape)} and top_k_weights "
                         f"{tuple(top_k_weights.shape)} must both be [N, K] with N = {n}")
    # Pair ids and the padded pair layout are int32 in the kernels.
    if top_k_index.numel() + e * 64 + 64 > INT32_MAX:
        raise ValueError(f"{_OP}: {top_k_index.numel()} (token, expert) pairs is past the int32 pair index")


def moe_experts(hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, gate_up: Tensor,
                down: Tensor, gate_up_bias: Tensor | None = None, down_bias: Tensor | None = None, *,
                interleaved: bool = False, activation: str = "silu", alpha: float | None = None,
                limit: float | None = None) -> Tensor:
    """Routed gated experts: ``sum_k w[t, k] * (down[e] @ act(g, u) + down_bias[e])``, with
    ``[g; u] = gate_up[e] @ x[t] + gate_up_bias[e]``.

    hidden_states [N, H] (any strides), top_k_index [N, K] integer expert ids (an id outside [0, E)
    routes the pair to no expert), top_k_weights [N, K] (any float dtype; its gradient comes back in
    it), gate_up [E, 2I, H], down [E, H, I]; the weights any strides (pass a transposed [E, H, 2I]
    weight as ``w.transpose(1, 2)``), same dtype as hidden_states. The gate's I rows come first, or with
    ``interleaved=True`` gate and up rows alternate (gate row 2j, up row 2j + 1). Optional biases
    gate_up_bias [E, 2I] (in gate_up's row order) and down_bias [E, H], added before the routing weight.
    activation "silu": act = silu(g) * u; "clamped_swiglu" (gpt-oss; needs alpha and limit):
    act = min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u, -limit, limit) + 1), the clamps
    passing no gradient where they bind. Math in fp32; gate, up, the activation and each pair's
    weighted output are rounded to the input dtype (as a bf16 model computes them); the top-k sum is in
    fp32.

    >>> import torch
    >>> from fastkern.ops.moe_experts import moe_experts
    >>> x, ids, w = torch.randn(3, 8), torch.tensor([[0, 1], [1, 0], [1, 1]]), torch.rand(3, 2)
    >>> moe_experts(x, ids, w, torch.randn(2, 12, 8), torch.randn(2, 8, 6)).shape
    torch.Size([3, 8])
    """
    act = (interleaved,) + _activation(activation, alpha, limit)
    _check(hidden_states, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias, interleaved)
    if torch.compiler.is_compiling():
        return moe_experts_forward_op(hidden_states, top_k_index, top_k_weights, gate_up, down, gate_up_bias,
                                      down_bias, *act)[0]
    return MoEExpertsFunction.apply(hidden_states, top_k_index, top_k_weights, gate_up, down, gate_up_bias,
                                    down_bias, *act)
