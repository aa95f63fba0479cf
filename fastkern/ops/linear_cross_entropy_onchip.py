"""On-chip linear cross-entropy and log-probabilities: the LM-head GEMM in Triton, logit tiles kept on chip.

Tiers: the kernels in fastkern/kernels/linear_cross_entropy_onchip.py; the launchers below
(:func:`onchip_stats`, :func:`onchip_grads`); two custom ops (``fastkern::lce_onchip_stats``,
``fastkern::lce_onchip_grads``) with fake implementations for torch.compile; two autograd Functions.
The public entry points are ``fused_linear_cross_entropy(..., impl="onchip")`` and
``fused_linear_logprobs(..., impl="onchip")``, which validate their arguments and call
:func:`onchip_cross_entropy` / :func:`onchip_logprobs` here.

Forward: one pass of the head GEMM keeps per-row online statistics (no [N, V] buffer, only
[splits, N] partials). Backward: the head GEMM again, the gradient tile formed on chip and multiplied
into dH (and dW when the weight is trainable) with fp32 atomics. 4 GEMMs with a trainable head and 3
frozen (the chunked path: 3 and 2), for extra memory of O(N + V) plus bounded fp32 accumulators.
docs/linear_cross_entropy.md ("On-chip kernel") has the FLOP and byte counts.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import runtime
from ._common import cdiv, device_guard, output_buffer
from .linear_cross_entropy import _finish, check_targets

# fp32 accumulator budgets of the backward. dW is accumulated one vocabulary chunk at a time into an
# fp32 buffer of at most this size (then cast into the weight-dtype gradient: one rounding); dH in
# fp32 for all rows when dW is computed (the vocabulary chunks revisit every row), else per row chunk.
DW_ACCUMULATOR_BYTES = 64 * 2**20
DH_ACCUMULATOR_BYTES = 32 * 2**20
# Forward programs wanted per SM: vocabulary splits are added until row blocks x splits reach this.
FWD_PROGRAMS_PER_SM = 4
# Row block of the forward on the GPU (fixed, so the number of splits is known before the launch).
FWD_BLOCK_N = 128
# The interpreter pays per program and per op, not per lane: small tiles, one config, and 3 vocabulary
# splits so the split combine (including empty splits) is exercised by every CPU test.
_INTERP_FWD = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_K=32)
_INTERP_BWD = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_K=32, BLOCK_H=32, GROUP_N=2)
_INTERP_SPLITS = 3


def supported(hidden: Tensor) -> bool:
    """Whether the on-chip kernels can run for these inputs (Triton on the GPU or the interpreter;
    float64 and the reference path go to the chunked implementation)."""
    if hidden.dtype == torch.float64:
        return False
    if torch.compiler.is_compiling():
        return _kernels_run_on(hidden.device.type)
    return runtime.path_for(hidden) in ("triton", "interpreter")


@torch.compiler.assume_constant_result
def _kernels_run_on(device_type: str) -> bool:
    # Dynamo cannot trace the context variable runtime.path_for reads; the answer is fixed per
    # compiled graph (device type, Triton, the interpreter switch), so it is baked in at trace time.
    return runtime.path_for(torch.empty(0, device=device_type)) in ("triton", "interpreter")


def _interpreted(t: Tensor) -> bool:
    return runtime.path_for(t) == "interpreter"


@functools.cache
def _tuned_kernels():
    """The two kernels wrapped in triton.autotune with a few Hopper configs (built on first GPU use).

    Capped at 4 configs each so that tuning a new (V, H) costs seconds, not minutes. The backward
    zeroes its accumulators between trials (its atomics add into them)."""
    import triton

    from ..kernels.linear_cross_entropy_onchip import lce_onchip_bwd_kernel, lce_onchip_fwd_kernel

    def cfg(kw, warps, stages):
        return triton.Config(kw, num_warps=warps, num_stages=stages)

    fwd = triton.autotune(
        configs=[cfg(dict(BLOCK_V=128, BLOCK_K=64), 8, 3), cfg(dict(BLOCK_V=256, BLOCK_K=64), 8, 3),
                 cfg(dict(BLOCK_V=128, BLOCK_K=64), 4, 4), cfg(dict(BLOCK_V=256, BLOCK_K=32), 8, 4)],
        key=["V", "H", "HAS_ENTROPY", "HAS_TOP1"],
    )(lce_onchip_fwd_kernel)
    bwd = triton.autotune(
        configs=[cfg(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, BLOCK_H=64, GROUP_N=8), 8, 3),
                 cfg(dict(BLOCK_N=64, BLOCK_V=256, BLOCK_K=64, BLOCK_H=64, GROUP_N=8), 8, 3),
                 cfg(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, BLOCK_H=128, GROUP_N=8), 8, 3),
                 cfg(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, BLOCK_H=128, GROUP_N=8), 4, 3)],
        key=["V", "H", "NEED_GH", "NEED_GW", "HAS_ENTROPY"],
        reset_to_zero=["dh_ptr", "dw_ptr", "db_ptr"],
    )(lce_onchip_bwd_kernel)
    return fwd, bwd


def _dot_precision(t: Tensor) -> str:
    # fp32 inputs: a true fp32 product, like torch's default matmul (TF32 would cost ~1e-3 relative).
    return "ieee" if t.dtype == torch.float32 else "tf32"


def fwd_splits(n: int, v: int, device: torch.device, block_n: int = FWD_BLOCK_N, block_v: int = 128) -> int:
    """Vocabulary splits of the forward: enough programs to fill the GPU when N is small."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    row_blocks = max(1, math.ceil(n / block_n))
    return max(1, min(math.ceil(FWD_PROGRAMS_PER_SM * sms / row_blocks), math.ceil(v / block_v)))


def onchip_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *, logit_scale: float,
                 softcap: float | None, u_scale: float, has_entropy: bool, has_top1: bool,
                 splits: int | None = None) -> dict[str, Tensor]:
    """Per-row statistics in fp32: lse, target_u (0 where target -1), sum_u, and sum_plogp (entropy),
    max_u and max_before_target (top-1) when asked. targets: [N] int64, -1 = no target."""
    from ..kernels.linear_cross_entropy_onchip import lce_onchip_fwd_kernel

    n, v, h = hidden.shape[0], weight.shape[0], hidden.shape[1]
    interp = _interpreted(hidden)
    if splits is None:
        splits = min(_INTERP_SPLITS, max(1, v)) if interp else fwd_splits(n, v, hidden.device)
    part = output_buffer((6, splits, n), torch.float32, hidden.device)
    if n and v:
        args = (hidden, weight, bias if bias is not None else hidden, targets, part, n, v, h, splits,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                float(logit_scale), float(softcap or 1.0), float(u_scale))
        flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_ENTROPY=has_entropy,
                     HAS_TOP1=has_top1, UPCAST=interp, DOT_PRECISION="ieee" if interp else _dot_precision(hidden))
        with device_guard(hidden):
            if interp:
                block_n = _INTERP_FWD["BLOCK_N"]
                lce_onchip_fwd_kernel[(cdiv(n, block_n), splits)](*args, **flags, **_INTERP_FWD)
            else:
                fwd, _ = _tuned_kernels()
                fwd[(cdiv(n, FWD_BLOCK_N), splits)](*args, **flags, BLOCK_N=FWD_BLOCK_N)
    else:
        part[0].fill_(float("-inf"))
        part[1:5].zero_()
        part[5].fill_(float("-inf"))
    return combine_splits(part, has_entropy, has_top1)


def combine_splits(part: Tensor, has_entropy: bool, has_top1: bool) -> dict[str, Tensor]:
    """Merge the per-split partials [6, splits, N] into per-row statistics.

    With M = max_k m_k: sum_exp = sum_k s_k exp(m_k - M), lse = M + log(sum_exp), and, from each
    split's centred sum c_k = sum_j exp(u_j - m_k) (u_j - m_k),
    sum_j p_j log p_j = sum_k exp(m_k - M) (c_k + (m_k - M) s_k) / sum_exp - log(sum_exp)
    (two non-positive terms: no cancellation on a confident row, unlike lse - sum_j p_j u_j)."""
    m, s, su_e, sum_u, target_u, before = part.unbind(0)
    big = m.max(0).values
    # Rows whose logits are all -inf: shift by 0 (exp(-inf - (-inf)) is NaN), as the kernel does.
    shift = torch.where(big == float("-inf"), torch.zeros_like(big), big)
    w = torch.exp(m - shift)
    sum_exp = (s * w).sum(0)
    stats = {"lse": shift + torch.log(sum_exp), "target_u": target_u.sum(0), "sum_u": sum_u.sum(0)}
    if has_entropy:
        # A split whose logits are all -inf has s_k = 0 and c_k = 0: its (m_k - M) s_k term is 0, not NaN.
        offset = torch.where(s > 0, (m - shift) * s, torch.zeros_like(s))
        stats["sum_plogp"] = ((su_e + offset) * w).sum(0) / sum_exp - torch.log(sum_exp)
    if has_top1:
        stats["max_u"] = big
        stats["max_before_target"] = before.max(0).values
    return stats


def onchip_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
                 sum_plogp: Tensor | None, coefs: list[Tensor], *, logit_scale: float, softcap: float | None,
                 u_scale: float, need_gh: bool, need_gw: bool, need_gb: bool):
    """(grad_hidden, grad_weight, grad_bias), each None if not asked; coefs = [a, b, c] or [a, b, c, e]
    per row (fp32): d objective / du_j = a p_j - b [j = t] - c + e p_j (S - u_j)."""
    from ..kernels.linear_cross_entropy_onchip import lce_onchip_bwd_kernel

    n, v, h = hidden.shape[0], weight.shape[0], hidden.shape[1]
    dev = hidden.device
    has_entropy = len(coefs) == 4
    a, b, c = (t.to(torch.float32).contiguous() for t in coefs[:3])
    e = coefs[3].to(torch.float32).contiguous() if has_entropy else a
    splogp = sum_plogp.to(torch.float32).contiguous() if has_entropy else a
    lse = lse.to(torch.float32).contiguous()
    gh = torch.zeros(n, h, dtype=hidden.dtype, device=dev) if need_gh else None
    gw = torch.zeros(v, h, dtype=weight.dtype, device=dev) if need_gw else None
    gb = torch.zeros(v, dtype=torch.float32, device=dev) if need_gb else None
    if not (need_gh or need_gw or need_gb) or n == 0 or v == 0:
        return gh, gw, gb

    # fp32 outputs are their own accumulators; 16-bit ones get fp32 buffers of bounded size.
    gh_direct = need_gh and hidden.dtype == torch.float32
    gw_direct = need_gw and weight.dtype == torch.float32
    row_bytes = h * 4
    if need_gw:
        # Every vocabulary chunk revisits every row: dH (when 16-bit) stays in fp32 for all rows.
        n_chunk = n
        v_chunk = v if gw_direct else max(1, min(v, DW_ACCUMULATOR_BYTES // row_bytes))
    else:
        n_chunk = n if (gh_direct or not need_gh) else max(1, min(n, DH_ACCUMULATOR_BYTES // row_bytes))
        v_chunk = v
    dh = gh if gh_direct else (torch.zeros(n_chunk, h, dtype=torch.float32, device=dev) if need_gh else None)
    dw = gw if gw_direct else (torch.zeros(v_chunk, h, dtype=torch.float32, device=dev) if need_gw else None)
    # Unused accumulator slots get their own buffers: the autotuner zeroes all three between trials,
    # so none may alias an input (lse) or another slot.
    dummies = [torch.zeros(1, dtype=torch.float32, device=dev) for _ in range(3)]
    interp = _interpreted(hidden)
    flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_ENTROPY=has_entropy,
                 NEED_GH=need_gh, NEED_GW=need_gw, NEED_GB=need_gb,
                 ROUND_BF16=interp and hidden.dtype == torch.bfloat16, UPCAST=interp,
                 DOT_PRECISION="ieee" if interp else _dot_precision(hidden))

    def launch(r0, r1, v0, v1):
        args = (hidden, weight, bias if bias is not None else hidden, targets, lse, splogp, a, b, c, e,
                dh if dh is not None else dummies[0], dw if dw is not None else dummies[1],
                gb if gb is not None else dummies[2],
                n, v, h, r0, r1, v0, v1, 0 if gh_direct else r0, 0 if gw_direct else v0,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                float(logit_scale), float(softcap or 1.0), float(u_scale))
        with device_guard(hidden):
            if interp:
                cfg = _INTERP_BWD
                grid = (cdiv(r1 - r0, cfg["BLOCK_N"]) * cdiv(v1 - v0, cfg["BLOCK_V"]),)
                lce_onchip_bwd_kernel[grid](*args, **flags, **cfg)
            else:
                _, bwd = _tuned_kernels()
                grid = lambda meta: (cdiv(r1 - r0, meta["BLOCK_N"]) * cdiv(v1 - v0, meta["BLOCK_V"]),)  # noqa: E731
                bwd[grid](*args, **flags)

    for r0 in range(0, n, n_chunk):
        r1 = min(r0 + n_chunk, n)
        for v0 in range(0, v, v_chunk):
            v1 = min(v0 + v_chunk, v)
            launch(r0, r1, v0, v1)
            if need_gw and not gw_direct:
                gw[v0:v1].copy_(dw[: v1 - v0])
                if v1 < v:
                    dw.zero_()
        if need_gh and not gh_direct:
            gh[r0:r1].copy_(dh[: r1 - r0])
            if r1 < n:
                dh.zero_()
    return gh, gw, gb


@torch.library.custom_op("fastkern::lce_onchip_stats", mutates_args=())
def lce_onchip_stats_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int | None,
                        logit_scale: float, softcap: float | None, u_scale: float, has_entropy: bool, has_top1: bool,
                        op: str) -> list[Tensor]:
    """[lse, target_u, sum_u, sum_plogp, max_u, max_before_target] (the last three empty unless asked).
    Labels are checked here (out of range raises), so torch.compile traces the op as one node."""
    targets = check_targets(op, labels, weight.shape[0], ignore_index)
    stats = onchip_stats(hidden, weight, bias, targets, logit_scale=logit_scale, softcap=softcap, u_scale=u_scale,
                         has_entropy=has_entropy, has_top1=has_top1)
    names = ("lse", "target_u", "sum_u", "sum_plogp", "max_u", "max_before_target")
    return [stats[k] if k in stats else hidden.new_empty(0, dtype=torch.float32) for k in names]


@lce_onchip_stats_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, logit_scale, softcap, u_scale, has_entropy, has_top1, op):
    n = hidden.shape[0]
    make = lambda k: hidden.new_empty(k, dtype=torch.float32)  # noqa: E731
    return [make(n), make(n), make(n), make(n if has_entropy else 0), make(n if has_top1 else 0),
            make(n if has_top1 else 0)]


@torch.library.custom_op("fastkern::lce_onchip_grads", mutates_args=())
def lce_onchip_grads_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int | None,
                        lse: Tensor, sum_plogp: Tensor | None, coefs: list[Tensor], logit_scale: float,
                        softcap: float | None, u_scale: float, need_gh: bool, need_gw: bool, need_gb: bool,
                        op: str) -> list[Tensor]:
    """[grad_hidden, grad_weight, grad_bias (fp32)]; a gradient not asked for is empty."""
    targets = check_targets(op, labels, weight.shape[0], ignore_index)
    grads = onchip_grads(hidden, weight, bias, targets, lse, sum_plogp, coefs, logit_scale=logit_scale,
                         softcap=softcap, u_scale=u_scale, need_gh=need_gh, need_gw=need_gw, need_gb=need_gb)
    # Custom-op outputs may not alias each other: one fresh empty tensor per missing gradient.
    return [g if g is not None else hidden.new_empty(0) for g in grads]


@lce_onchip_grads_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, lse, sum_plogp, coefs, logit_scale, softcap, u_scale, need_gh, need_gw,
      need_gb, op):
    gh = hidden.new_empty(hidden.shape) if need_gh else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_gw else hidden.new_empty(0)
    gb = hidden.new_empty(weight.shape[0], dtype=torch.float32) if need_gb else hidden.new_empty(0)
    return [gh, gw, gb]


def _token_losses(lse: Tensor, target_u: Tensor, sum_u: Tensor, eps: float, v: int) -> Tensor:
    loss = lse - (1.0 - eps) * target_u
    # sum_u enters only with label smoothing: it is -inf for a masked vocabulary, and 0 * -inf = NaN.
    return loss - (eps / v) * sum_u if eps else loss


class _OnchipLoss(torch.autograd.Function):
    """Cross-entropy per token (``row_weight`` None: reduction none) or its weighted sum. Forward:
    statistics only; backward: one recompute pass that forms and consumes the gradient on chip."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, row_weight, eps, opts, needs):
        ignore_index, logit_scale, softcap, op = opts
        v = weight.shape[0]
        lse, target_u, sum_u = lce_onchip_stats_op(hidden, weight, bias, labels, ignore_index, logit_scale, softcap,
                                                   1.0, False, False, op)[:3]
        valid = labels != ignore_index
        per_token = _token_losses(lse, target_u, sum_u, eps, v)
        if row_weight is None:
            loss = torch.where(valid, per_token, 0.0)
        else:
            # Ignored rows contribute nothing, even when their statistics are NaN (NaN hidden state).
            loss = torch.where(row_weight != 0, per_token * row_weight, 0.0).sum()
        ctx.save_for_backward(hidden, weight, bias, labels, lse, row_weight)
        ctx.opts, ctx.eps, ctx.needs = opts, eps, needs
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse, row_weight = ctx.saved_tensors
        ignore_index, logit_scale, softcap, op = ctx.opts
        eps, v = ctx.eps, weight.shape[0]
        if row_weight is None:
            g = torch.where(labels != ignore_index, grad_loss.to(torch.float32), 0.0)
        else:
            g = row_weight * grad_loss.to(torch.float32)
        grads = lce_onchip_grads_op(hidden, weight, bias, labels, ignore_index, lse, None,
                                    [g, g * (1.0 - eps), g * (eps / v)], logit_scale, softcap, 1.0, *ctx.needs, op)
        return (*_finish(grads, ctx.dtypes, ctx.needs), None, None, None, None, None)


class _OnchipLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts, needs, return_entropy, return_top1):
        logit_scale, softcap, inv_temperature, op = opts
        lse, target_u, sum_u, sum_plogp, max_u, max_before = lce_onchip_stats_op(
            hidden, weight, bias, targets, None, logit_scale, softcap, inv_temperature, return_entropy, return_top1, op)
        logp = target_u - lse
        # TRL's is_top1: the target is the first argmax (not differentiable).
        is_top1 = (target_u >= max_u) & (target_u > max_before) if return_top1 else lse.new_empty(0, dtype=torch.bool)
        mean_logits = sum_u / weight.shape[0]
        ctx.mark_non_differentiable(is_top1, mean_logits)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, sum_plogp)
        ctx.opts, ctx.needs, ctx.return_entropy = opts, needs, return_entropy
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return logp, (-sum_plogp) if return_entropy else lse.new_empty(0), is_top1, mean_logits

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_top1, _grad_mean_logits):
        hidden, weight, bias, targets, lse, sum_plogp = ctx.saved_tensors
        logit_scale, softcap, inv_temperature, op = ctx.opts
        use_entropy = ctx.return_entropy and grad_entropy is not None
        if grad_logp is None and not use_entropy:
            return (None,) * 8
        g = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(torch.float32)
        # d log p_t / du_j = [j = t] - p_j; d entropy / du_j = p_j (S - u_j), S = sum_j p_j u_j.
        coefs = [-g, -g, torch.zeros_like(g)] + ([grad_entropy.to(torch.float32)] if use_entropy else [])
        grads = lce_onchip_grads_op(hidden, weight, bias, targets, None, lse, sum_plogp if use_entropy else None, coefs,
                                    logit_scale, softcap, inv_temperature, *ctx.needs, op)
        return (*_finish(grads, ctx.dtypes, ctx.needs), None, None, None, None, None)


def onchip_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, *, op: str,
                         ignore_index: int, reduction: str, label_smoothing: float, logit_scale: float,
                         softcap: float | None, num_items_in_batch, needs) -> Tensor:
    """The loss for [N, H] hidden and [N] labels (arguments already validated by the public function)."""
    opts = (int(ignore_index), float(logit_scale), None if softcap is None else float(softcap), op)
    if reduction == "none":
        return _OnchipLoss.apply(hidden, weight, bias, labels, None, float(label_smoothing), opts, needs)
    valid = (labels != ignore_index).to(torch.float32)
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, device=hidden.device).to(torch.float32)
    elif reduction == "mean":
        denom = valid.sum().clamp(min=1.0)
    else:
        denom = torch.ones((), dtype=torch.float32, device=hidden.device)
    return _OnchipLoss.apply(hidden, weight, bias, labels, valid / denom, float(label_smoothing), opts, needs)


def onchip_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *, op: str,
                    temperature: float, logit_scale: float, softcap: float | None, return_entropy: bool,
                    return_top1: bool, needs):
    """(log_probs, entropy or empty, is_top1 or empty, mean_logits) for [N, H] hidden, [N] targets."""
    opts = (float(logit_scale), None if softcap is None else float(softcap), 1.0 / float(temperature), op)
    return _OnchipLogProbs.apply(hidden, weight, bias, targets, opts, needs, bool(return_entropy), bool(return_top1))


IMPLS = ("auto", "chunked", "onchip")


def use_onchip(op: str, impl: str, hidden: Tensor) -> bool:
    """The public functions' ``impl`` switch. "auto" is the chunked path until GPU measurements say
    otherwise per shape; "onchip" runs these kernels wherever Triton runs (GPU or interpreter; float64
    and the PyTorch reference path stay chunked)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: `impl` must be 'auto', 'chunked' or 'onchip', got {impl!r}")
    return impl == "onchip" and supported(hidden)
