"""Reference routed-expert MLP (SwiGLU experts over stacked weights): plain PyTorch, one expert at a time.

Same contract and rounding points as fastkern/kernels/moe_experts.py: math in fp32 (fp64 for fp64
inputs); gate, up, h = silu(gate) * up and each pair's weighted expert output are rounded to the input
dtype where the kernels store them; the sum over the top-k is taken in fp32. Pairs whose expert id lies
outside [0, E) (transformers' "no expert" id E) contribute nothing and get a zero routing-weight grad.

Shapes: x [N, H], top_k_index [N, K] (int), top_k_weights [N, K], gate_up [E, 2I, H] (gate rows
first), down [E, H, I]. ``gate_up_out`` is [N * K, 2I] by pair s = t * K + k, what backward reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pairs_of(top_k_index: torch.Tensor, e: int) -> torch.Tensor:
    return (top_k_index.reshape(-1) == e).nonzero().squeeze(1)


def moe_experts_forward_reference(x, top_k_index, top_k_weights, gate_up, down):
    """(out [N, H] in x's dtype, gate_up_out [N * K, 2I] in x's dtype)."""
    n, k = top_k_index.shape
    n_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    cdt, dt = _compute_dtype(x.dtype), x.dtype
    gu_out = torch.zeros(n * k, two_i, dtype=dt, device=x.device)
    y = torch.zeros(n * k, x.shape[1], dtype=dt, device=x.device)
    w_flat = top_k_weights.reshape(-1)
    for e in range(n_experts):
        s = _pairs_of(top_k_index, e)
        if s.numel() == 0:
            continue
        xs = x[s // k].to(cdt)
        gu = (xs @ gate_up[e].to(cdt).T).to(dt)
        gu_out[s] = gu
        gate, up = gu[:, :inter].to(cdt), gu[:, inter:].to(cdt)
        h = (F.silu(gate) * up).to(dt).to(cdt)
        y[s] = ((h @ down[e].to(cdt).T) * w_flat[s, None].to(cdt)).to(dt)
    out = y.view(n, k, -1).to(cdt).sum(1).to(dt)
    return out, gu_out


def moe_experts_backward_reference(grad_out, x, top_k_index, top_k_weights, gate_up, down, gate_up_out):
    """(d x, d top_k_weights, d gate_up, d down), each in its input's dtype."""
    n, k = top_k_index.shape
    n_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    cdt, dt = _compute_dtype(x.dtype), x.dtype
    w_flat = top_k_weights.reshape(-1)
    dy = grad_out.to(cdt)
    dx_pairs = torch.zeros(n * k, x.shape[1], dtype=cdt, device=x.device)
    dw = torch.zeros(n * k, dtype=cdt, device=x.device)
    d_gate_up = torch.zeros_like(gate_up)
    d_down = torch.zeros_like(down)
    for e in range(n_experts):
        s = _pairs_of(top_k_index, e)
        if s.numel() == 0:
            continue
        t = s // k
        gate, up = gate_up_out[s, :inter].to(cdt), gate_up_out[s, inter:].to(cdt)
        sig = torch.sigmoid(gate)
        act = gate * sig
        h = (act * up).to(dt).to(cdt)
        g = dy[t] @ down[e].to(cdt)  # d(unweighted expert output) pulled back through down: [pairs, I]
        dw[s] = (h * g).sum(1)
        ws = w_flat[s, None].to(cdt)
        d_down[e] = ((ws * dy[t]).to(dt).to(cdt).T @ h).to(down.dtype)
        dh = ws * g
        dgu = torch.cat([dh * up * (sig * (1 + gate * (1 - sig))), dh * act], dim=1).to(dt).to(cdt)
        d_gate_up[e] = (dgu.T @ x[t].to(cdt)).to(gate_up.dtype)
        dx_pairs[s] = (dgu @ gate_up[e].to(cdt)).to(dt).to(cdt)
    dx = dx_pairs.view(n, k, -1).sum(1).to(dt)
    return dx, dw.view(n, k).to(top_k_weights.dtype), d_gate_up, d_down
