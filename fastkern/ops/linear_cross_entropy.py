"""Fused linear cross-entropy: loss of ``hidden @ weight.T`` without the [N, V] logits.

Tiers: the row kernel in fastkern/kernels/linear_cross_entropy.py (or its PyTorch twin in
fastkern/reference), driven chunk by chunk by :func:`run_chunks` below; two custom ops
(``fastkern::lce_stats``, ``fastkern::lce_grads``) with fake implementations so
torch.compile(fullgraph=True) traces through them; an autograd Function; the public
:func:`fused_linear_cross_entropy`. fastkern/ops/linear_logprobs.py reuses the same two ops.

Per chunk of ``rows`` tokens: one cuBLAS GEMM writes the raw logits chunk [rows, V] in the input
dtype; the row kernel turns it, in place, into d(loss)/d(logits); two more GEMMs give
grad_hidden[chunk] (written directly, no accumulation needed) and grad_weight += chunk^T @ hidden.
For reductions "mean" and "sum" the loss is a scalar, so all of that happens in the forward (3 GEMMs
total, no recompute) and backward only scales by the upstream gradient. Reduction "none" and the
log-prob op keep per-row statistics instead and recompute the logits in backward (4 GEMMs).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ..reference.linear_cross_entropy import lce_rows_reference
from ._common import as_rows, check_tensor, device_guard, op_path, output_buffer

_OP = "fastkern.ops.fused_linear_cross_entropy"
# The logits chunk (input dtype) is sized to this many bytes unless free device memory is lower.
CHUNK_BYTES_CAP = 512 * 2**20
# Without a weight gradient, a chunk needs only enough tokens to keep its two GEMMs compute-bound:
# each reads the whole [V, H] weight once (2VH bytes) for 2*rows*V*H FLOPs, i.e. `rows` FLOP/byte,
# and an H100 needs ~230 (700 TFLOP/s over 3 TB/s). 512 tokens is twice that; more only adds memory
# (DPO/GRPO reference passes, LoRA heads). With a weight gradient the chunk stays large: every chunk
# also reads and writes the whole gradient (4VH bytes), a cost that falls only with fewer chunks.
FROZEN_CHUNK_ROWS = 512
# A grad_weight accumulator this small is kept in fp32 even for bf16/fp16 weights. Larger ones are
# accumulated by cuBLAS in the weight dtype (fp32 inside each chunk's GEMM, one rounding per chunk):
# an fp32 copy of a 128K-vocabulary head is 2 GiB, twice the gradient itself.
FP32_ACCUMULATOR_BYTES = 64 * 2**20
_BLOCK = 1024


def chunk_rows(n_rows: int, n_cols: int, dtype: torch.dtype, device: torch.device, chunk_size: int,
               weight_grad: bool = True) -> int:
    """Tokens per chunk: ``chunk_size`` if given (> 0), else read from free memory now (per call) and,
    when no weight gradient is computed, at most FROZEN_CHUNK_ROWS."""
    if chunk_size > 0:
        return max(1, min(chunk_size, n_rows))
    budget = CHUNK_BYTES_CAP
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 4)
    elem = torch.finfo(dtype).bits // 8
    rows = max(1, budget // max(1, n_cols * elem))
    if not weight_grad:
        rows = min(rows, FROZEN_CHUNK_ROWS)
    if rows >= 256:
        rows -= rows % 128  # GEMM-friendly tile multiple
    return max(1, min(rows, n_rows))


def _launch_rows(x, targets, stats, coefs, *, logit_scale, softcap, u_scale, compute_stats, has_entropy,
                round_bf16):
    from ..kernels.linear_cross_entropy import lce_rows_kernel

    dummy = stats["lse"]
    coef = coefs or {}
    with device_guard(x):
        lce_rows_kernel[(x.shape[0],)](
            x, x.stride(0), targets,
            stats["lse"], stats["target_u"], stats["sum_u"], stats.get("sum_plogp", dummy),
            stats.get("max_u", dummy), stats.get("max_before_target", dummy),
            coef.get("a", dummy), coef.get("b", dummy), coef.get("c", dummy), coef.get("e", dummy),
            x.shape[1], float(logit_scale), float(softcap or 1.0), float(u_scale),
            HAS_SOFTCAP=softcap is not None, COMPUTE_STATS=compute_stats, WRITE_GRAD=coefs is not None,
            HAS_ENTROPY=has_entropy, HAS_TOP1="max_u" in stats and compute_stats,
            ROUND_BF16=round_bf16,
            BLOCK=_BLOCK, num_warps=8,
        )


def _addmm_into(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """acc (+)= a @ b with fp32 accumulation inside the product."""
    if acc.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        # Zeroed rather than beta=0: the out_dtype variant is only known to honour beta=1 (TRL's use).
        if first:
            acc.zero_()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=0.0 if first else 1.0)


def check_targets(op: str, labels: Tensor, n_cols: int, ignore_index: int | None) -> Tensor:
    """Labels -> kernel targets (-1 = no target); out-of-range labels raise, naming the argument."""
    valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    bad = valid & ((labels < 0) | (labels >= n_cols))
    if bool(bad.any()):
        first = labels[bad][0].item()
        name = "labels" if ignore_index is not None else "targets"
        raise ValueError(
            f"{op}: `{name}` has {int(bad.sum())} value(s) outside [0, {n_cols}) (e.g. {first}); vocabulary size is "
            f"weight.shape[0] = {n_cols}" + (f", ignore_index = {ignore_index}" if ignore_index is not None else "")
        )
    return torch.where(valid, labels, -1).to(torch.int64).contiguous()


def run_chunks(hidden, weight, bias, targets, stats, coefs, *, logit_scale, softcap, u_scale, compute_stats,
               has_entropy, need_gh, need_gw, need_gb, chunk_size, weight_grad_later=False):
    """One pass over token chunks; returns (grad_hidden, grad_weight, grad_bias), each None if not asked
    (all None when ``coefs`` is None: stats only)."""
    n, v = hidden.shape[0], weight.shape[0]
    grads = coefs is not None
    rows = chunk_rows(n, v, hidden.dtype, hidden.device, chunk_size,
                      weight_grad=(grads and need_gw) or weight_grad_later)
    gh = output_buffer(hidden.shape, hidden.dtype, hidden.device) if grads and need_gh else None
    gw = gb = None
    if grads and need_gw:
        gw = output_buffer(weight.shape, grad_weight_dtype(weight), weight.device)
    if grads and need_gb:
        gb = torch.zeros(v, dtype=torch.float64 if bias.dtype == torch.float64 else torch.float32, device=bias.device)
    path = op_path(hidden)
    buf = output_buffer((min(rows, n), v), hidden.dtype, hidden.device)
    w_t = weight.t()
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h, x = hidden[start:end], buf[: end - start]
        if bias is None:
            torch.mm(h, w_t, out=x)
        else:
            torch.addmm(bias, h, w_t, out=x)
        rows_stats = {k: s[start:end] for k, s in stats.items()}
        rows_coefs = None if coefs is None else {k: c[start:end] for k, c in coefs.items()}
        kw = dict(logit_scale=logit_scale, softcap=softcap, u_scale=u_scale, compute_stats=compute_stats,
                  has_entropy=has_entropy)
        if path == "reference":
            lce_rows_reference(x, targets[start:end], rows_stats, rows_coefs, **kw)
        else:
            # The GPU's fp32 -> bf16 store rounds to nearest even; only the interpreter needs it by hand.
            _launch_rows(x, targets[start:end], rows_stats, rows_coefs,
                         round_bf16=path == "interpreter" and x.dtype == torch.bfloat16, **kw)
        if not grads:
            continue
        if gh is not None:
            torch.mm(x, weight, out=gh[start:end])
        if gw is not None:
            _addmm_into(gw, x.t(), h, first=start == 0)
        if gb is not None:
            gb += x.sum(0, dtype=gb.dtype)
    if n == 0 and gw is not None:
        gw.zero_()
    return gh, gw, gb


def grad_weight_dtype(weight: Tensor) -> torch.dtype:
    if weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return weight.dtype if weight.numel() * 4 > FP32_ACCUMULATOR_BYTES else torch.float32


def _new_stats(n: int, device, has_entropy: bool, dtype=torch.float32) -> dict[str, Tensor]:
    names = ("lse", "target_u", "sum_u") + (("sum_plogp",) if has_entropy else ())
    return {k: output_buffer(n, dtype, device) for k in names}


def _stats_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastkern::lce_stats", mutates_args=())
def lce_stats_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int | None,
                 logit_scale: float, softcap: float | None, u_scale: float, has_entropy: bool, chunk_size: int,
                 op: str, has_top1: bool = False, weight_grad_later: bool = False) -> list[Tensor]:
    """[lse, target_u, sum_u, sum_plogp, max_u, max_before_target] per token (target_u 0 where ignored;
    sum_plogp empty without entropy, the last two empty without has_top1).

    ``weight_grad_later``: the backward of this forward will compute a weight gradient, with large
    chunks; this pass then uses the same large chunks (its buffer is freed before that backward, so it
    does not raise the peak, and small chunks cost the stats GEMM ~12% on an H100)."""
    targets = check_targets(op, labels, weight.shape[0], ignore_index)
    stats = _new_stats(hidden.shape[0], hidden.device, has_entropy, _stats_dtype(hidden))
    if has_top1:
        stats["max_u"] = output_buffer(hidden.shape[0], stats["lse"].dtype, hidden.device)
        stats["max_before_target"] = output_buffer(hidden.shape[0], stats["lse"].dtype, hidden.device)
    run_chunks(hidden, weight, bias, targets, stats, None, logit_scale=logit_scale, softcap=softcap,
               u_scale=u_scale, compute_stats=True, has_entropy=has_entropy, need_gh=False, need_gw=False,
               need_gb=False, chunk_size=chunk_size, weight_grad_later=weight_grad_later)
    names = ("lse", "target_u", "sum_u", "sum_plogp", "max_u", "max_before_target")
    return [stats[k] if k in stats else torch.empty(0, dtype=stats["lse"].dtype, device=hidden.device) for k in names]


@lce_stats_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, logit_scale, softcap, u_scale, has_entropy, chunk_size, op,
      has_top1=False, weight_grad_later=False):
    n, dt = hidden.shape[0], _stats_dtype(hidden)
    make = lambda k: hidden.new_empty(k, dtype=dt)  # noqa: E731
    m = n if has_top1 else 0
    return [make(n), make(n), make(n), make(n if has_entropy else 0), make(m), make(m)]


@torch.library.custom_op("fastkern::lce_grads", mutates_args=())
def lce_grads_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int | None,
                 coefs: list[Tensor], lse: Tensor | None, sum_plogp: Tensor | None, logit_scale: float,
                 softcap: float | None, u_scale: float, need_gh: bool, need_gw: bool, need_gb: bool,
                 chunk_size: int, op: str) -> list[Tensor]:
    """[grad_hidden, grad_weight, grad_bias, lse, target_u, sum_u] (a grad not asked for is empty).

    coefs = [a, b, c] or [a, b, c, e] per token (see the kernel's docstring). With ``lse`` None the
    statistics are computed in the same pass (the fused forward, which returns them); otherwise they are
    reused (backward) and the three statistics slots are empty.
    """
    targets = check_targets(op, labels, weight.shape[0], ignore_index)
    n, dt = hidden.shape[0], _stats_dtype(hidden)
    has_entropy = len(coefs) == 4
    compute_stats = lse is None
    stats = _new_stats(n, hidden.device, False, dt) if compute_stats else {
        "lse": lse.contiguous(), "target_u": torch.empty(0, dtype=dt, device=hidden.device),
        "sum_u": torch.empty(0, dtype=dt, device=hidden.device)}
    # The kernel indexes per-row vectors with stride 1; upstream gradients can be expanded (stride 0).
    coef_map = {k: c.to(dt).contiguous() for k, c in zip("abce", coefs)}
    if has_entropy:
        stats["sum_plogp"] = sum_plogp.contiguous()
    gh, gw, gb = run_chunks(hidden, weight, bias, targets, stats, coef_map, logit_scale=logit_scale,
                            softcap=softcap, u_scale=u_scale, compute_stats=compute_stats,
                            has_entropy=has_entropy, need_gh=need_gh, need_gw=need_gw, need_gb=need_gb,
                            chunk_size=chunk_size)
    # Custom-op outputs may not alias each other: one fresh empty tensor per missing gradient.
    out = [g if g is not None else hidden.new_empty(0) for g in (gh, gw, gb)]
    if compute_stats:
        return out + [stats["lse"], stats["target_u"], stats["sum_u"]]
    return out + [torch.empty(0, dtype=dt, device=hidden.device) for _ in range(3)]


@lce_grads_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, coefs, lse, sum_plogp, logit_scale, softcap, u_scale, need_gh,
      need_gw, need_gb, chunk_size, op):
    n, dt = hidden.shape[0], _stats_dtype(hidden)
    gh = hidden.new_empty(hidden.shape) if need_gh else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape, dtype=grad_weight_dtype(weight)) if need_gw else hidden.new_empty(0)
    gb = hidden.new_empty(weight.shape[0], dtype=dt) if need_gb else hidden.new_empty(0)
    m = n if lse is None else 0
    return [gh, gw, gb] + [hidden.new_empty(m, dtype=dt) for _ in range(3)]



def token_losses(lse: Tensor, target_u: Tensor, sum_u: Tensor, eps: float, v: int) -> Tensor:
    """Per-token cross-entropy with label smoothing ``eps`` from the row statistics."""
    loss = lse - (1.0 - eps) * target_u
    # sum_u enters only with label smoothing: it is -inf when a logit is (a masked vocabulary), and
    # 0 * -inf would make the loss NaN where F.cross_entropy is finite.
    return loss - (eps / v) * sum_u if eps else loss


def _finish(grads, dtypes, needs):
    """Gradients in their input's dtype, None where not needed."""
    return tuple(g.to(dt) if need else None for g, dt, need in zip(grads, dtypes, needs))


class _ReducedLoss(torch.autograd.Function):
    """reduction mean / sum: gradients are computed in the forward pass; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, row_weight, label_smoothing, opts, needs):
        ignore_index, logit_scale, softcap, chunk_size = opts
        v, eps = weight.shape[0], label_smoothing
        coefs = [row_weight, row_weight * (1.0 - eps), row_weight * (eps / v)]
        if any(needs):
            gh, gw, gb, lse, target_u, sum_u = lce_grads_op(
                hidden, weight, bias, labels, ignore_index, coefs, None, None, logit_scale, softcap, 1.0,
                needs[0], needs[1], needs[2], chunk_size, _OP)
        else:  # inference: statistics only
            lse, target_u, sum_u = lce_stats_op(hidden, weight, bias, labels, ignore_index, logit_scale,
                                                softcap, 1.0, False, chunk_size, _OP)[:3]
            gh = gw = gb = hidden.new_empty(0)
        # Ignored rows (weight 0) contribute nothing, even when their statistics are NaN (a NaN hidden
        # state under an ignored label), as in F.cross_entropy.
        loss = torch.where(row_weight != 0, token_losses(lse, target_u, sum_u, eps, v) * row_weight, 0.0).sum()
        ctx.needs = needs
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if torch.compiler.is_compiling():
            ctx.save_for_backward(gh, gw, gb)
        else:
            # Held outside save_for_backward so backward can scale them in place and hand them to
            # autograd as their only reference (no copy of a 1 GiB weight gradient).
            ctx.grads = (gh, gw, gb)
            ctx.recompute = (hidden, weight, bias, labels, coefs, opts)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.compiler.is_compiling():
            grads = [g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        elif ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            for g in grads:
                if g.numel():
                    g.mul_(grad_loss.to(g.dtype))
        else:  # a second backward through a retained graph: recompute
            hidden, weight, bias, labels, coefs, (ignore_index, logit_scale, softcap, chunk_size) = ctx.recompute
            grads = lce_grads_op(
                hidden, weight, bias, labels, ignore_index, [c * grad_loss for c in coefs], None, None,
                logit_scale, softcap, 1.0, *ctx.needs, chunk_size, _OP)[:3]
        return (*_finish(grads, ctx.dtypes, ctx.needs), None, None, None, None, None)


class _PerTokenLoss(torch.autograd.Function):
    """reduction none: statistics in forward; backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, label_smoothing, opts, needs):
        ignore_index, logit_scale, softcap, chunk_size = opts
        v, eps = weight.shape[0], label_smoothing
        lse, target_u, sum_u = lce_stats_op(hidden, weight, bias, labels, ignore_index, logit_scale, softcap,
                                            1.0, False, chunk_size, _OP, False, needs[1])[:3]
        valid = labels != ignore_index
        loss = torch.where(valid, token_losses(lse, target_u, sum_u, eps, v), 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.opts, ctx.eps, ctx.needs = opts, eps, needs
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        ignore_index, logit_scale, softcap, chunk_size = ctx.opts
        eps, v = ctx.eps, weight.shape[0]
        g = torch.where(labels != ignore_index, grad_loss.to(lse.dtype), 0.0)
        grads = lce_grads_op(hidden, weight, bias, labels, ignore_index, [g, g * (1.0 - eps), g * (eps / v)], lse,
                             None, logit_scale, softcap, 1.0, *ctx.needs, chunk_size, _OP)[:3]
        return (*_finish(grads, ctx.dtypes, ctx.needs), None, None, None, None)


def needs_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[bool, bool, bool]:
    on = torch.is_grad_enabled()
    return (on and hidden.requires_grad, on and weight.requires_grad, on and bias is not None and bias.requires_grad)


def check_head(op: str, hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_size) -> None:
    check_tensor(op, "hidden", hidden)
    check_tensor(op, "weight", weight)
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: `weight` must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(op, name, t)
        if t.device != hidden.device or t.dtype != hidden.dtype:
            raise TypeError(f"{op}: `{name}` is {t.dtype} on {t.device} but `hidden` is {hidden.dtype} on "
                            f"{hidden.device}; cast one of them")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: `bias` must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{op}: `chunk_size` must be a positive int (tokens per chunk) or None, got {chunk_size!r}")


def check_num_items(op: str, num_items_in_batch, reduction: str) -> None:
    if reduction == "none":
        raise ValueError(f"{op}: `num_items_in_batch` divides a summed loss; it needs reduction 'mean' or 'sum'")
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{op}: `num_items_in_batch` must be a number or a tensor, got {num_items_in_batch!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"{op}: `num_items_in_batch` must hold one number, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        if torch.compiler.is_compiling():  # a data-dependent check: one host sync, not traceable
            return
        value = num_items_in_batch.item()
    else:
        value = num_items_in_batch
    # Not `value <= 0`: NaN must fail too. A count of 0 (no target in the whole accumulated batch) would
    # give inf or NaN; the caller has to skip such a step rather than divide by it.
    if not value > 0:
        raise ValueError(f"{op}: `num_items_in_batch` must be > 0 (the number of target tokens across the "
                         f"accumulated batch), got {value}")


def check_index_tensor(op: str, name: str, t, hidden: Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: `{name}` must be an int64 or int32 tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if tuple(t.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{op}: `{name}` has shape {tuple(t.shape)} but hidden has leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if t.device != hidden.device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `hidden` is on {hidden.device}")


def fused_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, softcap: float | None = None, logit_scale: float = 1.0,
    num_items_in_batch=None, chunk_size: int | None = None, impl: str = "auto",
) -> Tensor:
    """Cross-entropy of ``z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` (no tanh
    when softcap is None) against ``labels``, without building the [N, V] logits.

    hidden [..., H] (fp32 / bf16 / fp16, fp64 runs the reference), weight [V, H] and bias [V] in the same
    dtype, labels [...] int64 (already shifted). Equals ``F.cross_entropy(z.float(), labels,
    ignore_index=..., reduction=..., label_smoothing=...)``, except that a "mean" over no valid label is 0
    (with zero gradients), not NaN. ``num_items_in_batch`` (int or tensor; gradient accumulation) makes
    the result the summed loss divided by it, for reduction "mean" or "sum". The loss is fp32; gradients
    come back in the inputs' dtype, and are not computed for tensors that do not require grad (a frozen
    LoRA head costs two GEMMs, not three). ``chunk_size``: tokens per chunk; None picks it from free
    device memory at each call. Labels outside [0, V) (other than ignore_index) raise ValueError.
    ``impl``: "chunked" (cuBLAS chunks), "onchip" (Triton GEMM with the logit tiles kept on chip, no
    chunk buffer; fastkern/ops/linear_cross_entropy_onchip.py) or "auto" (currently "chunked").

    >>> import torch, torch.nn.functional as F, fastkern
    >>> h, w, y = torch.randn(5, 8), torch.randn(11, 8), torch.tensor([1, 0, -100, 10, 3])
    >>> loss = fastkern.ops.fused_linear_cross_entropy(h, w, y)
    >>> torch.allclose(loss, F.cross_entropy(h @ w.T, y), atol=1e-5)
    True
    """
    op = _OP
    check_head(op, hidden, weight, bias, chunk_size)
    check_index_tensor(op, "labels", labels, hidden)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: `reduction` must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{op}: `label_smoothing` must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"{op}: `softcap` must be > 0 or None, got {softcap}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{op}: `ignore_index` must be an int (the label value to skip; -100 in transformers), got "
                        f"{ignore_index!r}")
    if num_items_in_batch is not None:
        check_num_items(op, num_items_in_batch, reduction)
    h2, y = as_rows(hidden), labels.reshape(-1)
    opts = (int(ignore_index), float(logit_scale), None if softcap is None else float(softcap), chunk_size or 0)
    needs = needs_grads(hidden, weight, bias)
    from . import linear_cross_entropy_onchip as onchip

    if onchip.use_onchip(op, impl, h2):
        out = onchip.onchip_cross_entropy(
            h2, weight, bias, y, op=op, ignore_index=int(ignore_index), reduction=reduction,
            label_smoothing=float(label_smoothing), logit_scale=float(logit_scale), softcap=softcap,
            num_items_in_batch=num_items_in_batch, needs=needs)
        return out.view(labels.shape) if reduction == "none" else out
    if reduction == "none":
        out = _PerTokenLoss.apply(h2, weight, bias, y, float(label_smoothing), opts, needs)
        return out.view(labels.shape)
    stats_dtype = _stats_dtype(hidden)
    valid = (y != ignore_index).to(stats_dtype)
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch, device=hidden.device).to(stats_dtype)
    elif reduction == "mean":
        denom = valid.sum().clamp(min=1.0)
    else:
        denom = torch.ones((), dtype=stats_dtype, device=hidden.device)
    return _ReducedLoss.apply(h2, weight, bias, y, valid / denom, float(label_smoothing), opts, needs)
