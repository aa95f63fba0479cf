"""Per-token log-probabilities (and entropy) of ``hidden @ weight.T`` without the [N, V] logits.

Same chunked machinery as fastkern/ops/linear_cross_entropy.py (the ``fastkern::lce_stats`` and
``fastkern::lce_grads`` custom ops). Forward keeps four fp32 numbers per token (logsumexp, target
logit, and for the entropy sum_j p_j u_j); backward recomputes each logits chunk, turns it in place into
    g_lp * (onehot - p) + g_H * p * (S - u)       (S = sum_j p_j u_j, u = transformed logits)
times the softcap derivative, and runs the gradient GEMMs. Both outputs are differentiable, with any
upstream gradients (GRPO can use the entropy as a bonus).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import as_rows
from .linear_cross_entropy import _finish, check_head, check_index_tensor, lce_grads_op, lce_stats_op, needs_grads

_OP = "fastkern.ops.fused_linear_logprobs"


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts, needs, return_top1):
        logit_scale, softcap, inv_temperature, return_entropy, chunk_size = opts
        lse, target_u, sum_u, sum_plogp, max_u, max_before = lce_stats_op(
            hidden, weight, bias, targets, None, logit_scale, softcap, inv_temperature, return_entropy, chunk_size,
            _OP, return_top1, needs[1])
        logp = target_u - lse
        # TRL's is_top1: the target is the first argmax (not differentiable).
        is_top1 = (target_u >= max_u) & (target_u > max_before) if return_top1 else lse.new_empty(0, dtype=torch.bool)
        mean_logits = sum_u / weight.shape[0]  # of the transformed logits, as TRL reports it
        ctx.mark_non_differentiable(is_top1, mean_logits)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, sum_plogp)
        ctx.opts, ctx.needs = opts, needs
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return logp, (-sum_plogp) if return_entropy else lse.new_empty(0), is_top1, mean_logits

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_top1, _grad_mean_logits):
        hidden, weight, bias, targets, lse, sum_plogp = ctx.saved_tensors
        logit_scale, softcap, inv_temperature, return_entropy, chunk_size = ctx.opts
        if grad_logp is None and (grad_entropy is None or not return_entropy):
            return None, None, None, None, None, None, None
        g = torch.zeros_like(lse) if grad_logp is None else grad_logp.to(lse.dtype)
        coefs = [-g, -g, torch.zeros_like(g)]
        if return_entropy and grad_entropy is not None:
            coefs.append(grad_entropy.to(lse.dtype))
        grads = lce_grads_op(hidden, weight, bias, targets, None, coefs, lse, sum_plogp if len(coefs) == 4 else None,
                             logit_scale, softcap, inv_temperature, *ctx.needs, chunk_size, _OP)[:3]
        return (*_finish(grads, ctx.dtypes, ctx.needs), None, None, None, None)


def fused_linear_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None, temperature: float = 1.0,
    softcap: float | None = None, logit_scale: float = 1.0, return_entropy: bool = False,
    chunk_size: int | None = None, impl: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax(z / temperature)[targets]`` per token, z as in
    :func:`fastkern.ops.fused_linear_cross_entropy`, and with ``return_entropy`` also the entropy of that
    distribution, both fp32 and differentiable, without building the [N, V] logits.

    hidden [..., H], weight [V, H], bias [V] (same dtype), targets [...] int64 in [0, V) (out-of-range
    targets raise ValueError). ``chunk_size``: tokens per chunk; None picks it from free device memory
    at each call. ``impl``: "chunked", "onchip" or "auto", as in fused_linear_cross_entropy.

    >>> import torch, fastkern
    >>> h, w, t = torch.randn(4, 8), torch.randn(11, 8), torch.tensor([1, 0, 7, 10])
    >>> lp, ent = fastkern.ops.fused_linear_logprobs(h, w, t, return_entropy=True)
    >>> torch.allclose(lp, torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0], atol=1e-5)
    True
    """
    op = _OP
    check_head(op, hidden, weight, bias, chunk_size)
    check_index_tensor(op, "targets", targets, hidden)
    if not float(temperature) > 0:
        raise ValueError(f"{op}: `temperature` must be > 0, got {temperature}")
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"{op}: `softcap` must be > 0 or None, got {softcap}")
    opts = (float(logit_scale), None if softcap is None else float(softcap), 1.0 / float(temperature),
            bool(return_entropy), chunk_size or 0)
    h2, t = as_rows(hidden), targets.reshape(-1)
    from . import linear_cross_entropy_onchip as onchip

    if onchip.use_onchip(op, impl, h2):
        logp, entropy, _, _ = onchip.onchip_logprobs(
            h2, weight, bias, t, op=op, temperature=float(temperature), logit_scale=float(logit_scale),
            softcap=softcap, return_entropy=bool(return_entropy), return_top1=False,
            needs=needs_grads(hidden, weight, bias))
    else:
        logp, entropy, _, _ = _LogProbs.apply(h2, weight, bias, t, opts, needs_grads(hidden, weight, bias), False)
    if return_entropy:
        return logp.view(targets.shape), entropy.view(targets.shape)
    return logp.view(targets.shape)


def logprobs_entropy_top1(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                          temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                          return_entropy: bool = False, impl: str = "auto"):
    """(log_probs, entropy or None, is_top1, mean_logits) for [N, H] hidden: what TRL's fused head asks
    for (fastkern/integrations/trl.py). is_top1: the target is the first argmax of the logits;
    mean_logits: the mean of the transformed logits. Neither is differentiable."""
    check_head(_OP, hidden, weight, bias, None)
    check_index_tensor(_OP, "targets", targets, hidden)
    opts = (float(logit_scale), None if softcap is None else float(softcap), 1.0 / float(temperature),
            bool(return_entropy), 0)
    from . import linear_cross_entropy_onchip as onchip

    if onchip.use_onchip(_OP, impl, hidden):
        logp, entropy, is_top1, mean_logits = onchip.onchip_logprobs(
            hidden, weight, bias, targets, op=_OP, temperature=float(temperature), logit_scale=float(logit_scale),
            softcap=softcap, return_entropy=bool(return_entropy), return_top1=True,
            needs=needs_grads(hidden, weight, bias))
        return logp, entropy if return_entropy else None, is_top1, mean_logits
    logp, entropy, is_top1, mean_logits = _LogProbs.apply(hidden, weight, bias, targets, opts,
                                                          needs_grads(hidden, weight, bias), True)
    return logp, entropy if return_entropy else None, is_top1, mean_logits
