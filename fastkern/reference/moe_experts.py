"""Reference routed-expert MLP (gated experts over stacked weights): plain PyTorch, one expert at a time.

Same contract and rounding points as fastkern/kernels/moe_experts.py: math in fp32 (fp64 for fp64
inputs); gate, up (bias included), h = act(gate, up) and each pair's weighted expert output are
rounded to the input dtype where the kernels store them; the sum over the top-k is taken in fp32.
Pairs whose expert id lies outside [0, E) (transformers' "no expert" id E) contribute nothing and get
a zero routing-weight grad.

Shapes: x [N, H], top_k_index [N, K] (int), top_k_weights [N, K], gate_up [E, 2I, H], down [E, H, I],
optional gate_up_bias [E, 2I] and down_bias [E, H]. The gate and up rows of gate_up (and columns of its
bias) are concatenated (gate rows first) or, with ``interleaved``, alternate (gate row 2j, up row
2j + 1). ``gate_up_out`` is [N * K, 2I] by pair s = t * K + k in the weights' column order, what
backward reads. Activation: silu(gate) * up, or with ``clamped`` gpt-oss's
min(gate, limit) * sigmoid(alpha * min(gate, limit)) * (clamp(up, -limit, limit) + 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pairs_of(top_k_index: torch.Tensor, e: int) -> torch.Tensor:
    return (top_k_index.reshape(-1) == e).nonzero().squeeze(1)


def _split(gu: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if interleaved:
        return gu[:, 0::2], gu[:, 1::2]
    inter = gu.shape[1] // 2
    return gu[:, :inter], gu[:, inter:]


def _join(d_gate: torch.Tensor, d_up: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack([d_gate, d_up], dim=2).flatten(1)
    return torch.cat([d_gate, d_up], dim=1)


def _glu(gate, up, clamped, alpha, limit):
    if clamped:
        g = gate.clamp(max=limit)
        return g * torch.sigmoid(alpha * g) * (up.clamp(-limit, limit) + 1)
    return F.silu(gate) * up


def _glu_backward(gate, up, dh, clamped, alpha, limit):
    """(h, d gate, d up); a binding clamp passes no gradient, as torch.clamp's backward."""
    if clamped:
        g = gate.clamp(max=limit)
        u = up.clamp(-limit, limit)
        sig = torch.sigmoid(alpha * g)
        glu = g * sig
        d_gate = torch.where(gate <= limit, dh * (u + 1) * (sig * (1 + alpha * g * (1 - sig))), 0.0)
        d_up = torch.where((up >= -limit) & (up <= limit), dh * glu, 0.0)
        return glu * (u + 1), d_gate, d_up
    sig = torch.sigmoid(gate)
    act = gate * sig
    return act * up, dh * up * (sig * (1 + gate * (1 - sig))), dh * act


def moe_experts_forward_reference(x, top_k_index, top_k_weights, gate_up, down, gate_up_bias=None,
                                  down_bias=None, interleaved=False, clamped=False, alpha=1.0, limit=0.0):
    """(out [N, H] in x's dtype, gate_up_out [N * K, 2I] in x's dtype)."""
    n, k = top_k_index.shape
    n_experts, two_i, _ = gate_up.shape
    cdt, dt = _compute_dtype(x.dtype), x.dtype
    gu_out = torch.zeros(n * k, two_i, dtype=dt, device=x.device)
    y = torch.zeros(n * k, x.shape[1], dtype=dt, device=x.device)
    w_flat = top_k_weights.reshape(-1)
    for e in range(n_experts):
        s = _pairs_of(top_k_index, e)
        if s.numel() == 0:
            continue
        xs = x[s // k].to(cdt)
        gu = xs @ gate_up[e].to(cdt).T
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[e].to(cdt)
        gu = gu.to(dt)
        gu_out[s] = gu
        gate, up = _split(gu.to(cdt), interleaved)
        h = _glu(gate, up, clamped, alpha, limit).to(dt).to(cdt)
        ys = h @ down[e].to(cdt).T
        if down_bias is not None:
            ys = ys + down_bias[e].to(cdt)
        y[s] = (ys * w_flat[s, None].to(cdt)).to(dt)
    out = y.view(n, k, -1).to(cdt).sum(1).to(dt)
    return out, gu_out


def moe_experts_backward_reference(grad_out, x, top_k_index, top_k_weights, gate_up, down, gate_up_out,
                                   gate_up_bias=None, down_bias=None, interleaved=False, clamped=False,
                                   alpha=1.0, limit=0.0):
    """(d x, d top_k_weights, d gate_up, d down, d gate_up_bias, d down_bias), each in its input's dtype;
    the bias gradients are None where the bias is."""
    n, k = top_k_index.shape
    n_experts = gate_up.shape[0]
    cdt, dt = _compute_dtype(x.dtype), x.dtype
    w_flat = top_k_weights.reshape(-1)
    dy = grad_out.to(cdt)
    dx_pairs = torch.zeros(n * k, x.shape[1], dtype=cdt, device=x.device)
    dw = torch.zeros(n * k, dtype=cdt, device=x.device)
    d_gate_up = torch.zeros_like(gate_up)
    d_down = torch.zeros_like(down)
    d_gu_bias = None if gate_up_bias is None else torch.zeros_like(gate_up_bias)
    d_down_bias = None if down_bias is None else torch.zeros_like(down_bias)
    for e in range(n_experts):
        s = _pairs_of(top_k_index, e)
        if s.numel() == 0:
            continue
        t = s // k
        gate, up = _split(gate_up_out[s].to(cdt), interleaved)
        g = dy[t] @ down[e].to(cdt)  # d(unweighted expert output) pulled back through down: [pairs, I]
        ws = w_flat[s, None].to(cdt)
        h, d_gate, d_up = _glu_backward(gate, up, ws * g, clamped, alpha, limit)
        h = h.to(dt).to(cdt)
        dw[s] = (h * g).sum(1)
        if down_bias is not None:
            dw[s] += dy[t] @ down_bias[e].to(cdt)
        scaled = (ws * dy[t]).to(dt).to(cdt)
        d_down[e] = (scaled.T @ h).to(down.dtype)
        if d_down_bias is not None:
            d_down_bias[e] = scaled.sum(0).to(down_bias.dtype)
        dgu = _join(d_gate, d_up, interleaved).to(dt).to(cdt)
        d_gate_up[e] = (dgu.T @ x[t].to(cdt)).to(gate_up.dtype)
        if d_gu_bias is not None:
            d_gu_bias[e] = dgu.sum(0).to(gate_up_bias.dtype)
        dx_pairs[s] = (dgu @ gate_up[e].to(cdt)).to(dt).to(cdt)
    dx = dx_pairs.view(n, k, -1).sum(1).to(dt)
    return dx, dw.view(n, k).to(top_k_weights.dtype), d_gate_up, d_down, d_gu_bias, d_down_bias
