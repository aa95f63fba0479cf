"""Plain PyTorch references for the linear cross-entropy / log-probability ops.

Two things live here:

* :func:`lce_rows_reference`: the same per-row math as ``lce_rows_kernel`` in
  fastkern/kernels/linear_cross_entropy.py (stats pass and in-place gradient pass over one chunk of
  raw logits), written with torch ops. It is the CPU path without the Triton interpreter and keeps
  the chunked memory behaviour of the kernel path (the chunk loop is shared, in fastkern/ops).
* :func:`linear_cross_entropy_reference` / :func:`linear_logprobs_reference`: the unchunked
  definitions, differentiable by autograd, used as the float64 oracle in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def transform_reference(x: torch.Tensor, logit_scale: float, softcap: float | None, u_scale: float):
    """(u, du/dx) for raw logits x: u = softcap * tanh(scale * x / softcap) * u_scale."""
    y = x * logit_scale
    if softcap is None:
        return y * u_scale, torch.full_like(x, logit_scale * u_scale)
    t = torch.tanh(y / softcap)
    return softcap * t * u_scale, logit_scale * u_scale * (1 - t * t)


def lce_rows_reference(
    x: torch.Tensor,
    targets: torch.Tensor,
    stats: dict[str, torch.Tensor],
    coefs: dict[str, torch.Tensor] | None,
    *,
    logit_scale: float,
    softcap: float | None,
    u_scale: float,
    compute_stats: bool,
    has_entropy: bool,
) -> None:
    """Stats into ``stats`` (lse, target_u, sum_u, sum_plogp = sum_j p_j log p_j; each [rows]) and, when ``coefs`` is given
    (a, b, c, e; each [rows]), d(objective)/dx written into ``x`` in place. targets: -1 = no target."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    u, dudx = transform_reference(x.to(ct), logit_scale, softcap, u_scale)
    has_target = targets >= 0
    safe_targets = targets.clamp(min=0).unsqueeze(1)
    if compute_stats:
        lse = torch.logsumexp(u, dim=1)
        stats["lse"].copy_(lse)
        target_u = u.gather(1, safe_targets).squeeze(1)
        stats["target_u"].copy_(torch.where(has_target, target_u, torch.zeros_like(target_u)))
        stats["sum_u"].copy_(u.sum(1))
        if has_entropy:
            logp = u - lse.unsqueeze(1)
            p = torch.exp(logp)
            # p log p -> 0 as p -> 0: a -inf logit (masked vocabulary) adds nothing, not 0 * -inf = NaN.
            stats["sum_plogp"].copy_(torch.where(p > 0, p * logp, 0.0).sum(1))
        if "max_u" in stats:
            stats["max_u"].copy_(u.max(1).values)
            cols = torch.arange(u.shape[1], device=u.device)
            before = torch.where(cols.unsqueeze(0) < targets.unsqueeze(1), u, float("-inf"))
            stats["max_before_target"].copy_(before.max(1).values if u.shape[1] else before.sum(1))
    if coefs is None:
        return
    lse = stats["lse"].to(ct).unsqueeze(1)
    p = torch.exp(u - lse)
    du = coefs["a"].to(ct).unsqueeze(1) * p - coefs["c"].to(ct).unsqueeze(1)
    onehot_b = torch.where(has_target, coefs["b"].to(ct), torch.zeros_like(coefs["b"], dtype=ct))
    du.scatter_add_(1, safe_targets, -onehot_b.unsqueeze(1))
    if has_entropy:
        # S - u_j with S = sum_k p_k u_k, as sum_k p_k log p_k - log p_j (no cancellation)
        entropy_term = coefs["e"].to(ct).unsqueeze(1) * p * (stats["sum_plogp"].to(ct).unsqueeze(1) - (u - lse))
        du += torch.where(p > 0, entropy_term, 0.0)
    x.copy_(du * dudx)


def _logits(hidden, weight, bias, logit_scale, softcap):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def linear_cross_entropy_reference(
    hidden, weight, labels, *, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
    softcap=None, logit_scale=1.0, num_items_in_batch=None,
):
    """The definition, with full [N, V] logits; all-ignored mean gives 0 (not NaN)."""
    z = _logits(hidden, weight, bias, logit_scale, softcap)
    per_token = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


def linear_logprobs_reference(hidden, weight, targets, *, bias=None, temperature=1.0, softcap=None, logit_scale=1.0):
    """(log p(target), entropy) per token, with full [N, V] logits."""
    z = _logits(hidden, weight, bias, logit_scale, softcap) / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    # p log p -> 0 as p -> 0: a -inf logit adds nothing to the entropy. Masked before the product, so
    # the gradient through the unused branch is 0 too (not 0 * -inf).
    entropy = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)
    return logp.gather(1, targets.unsqueeze(1)).squeeze(1), entropy
