"""Reference gated activations: out = act(gate) * up, math in fp32 (fp64 for fp64 inputs).

The same formulas as fastkern/kernels/glu.py, written with torch ops. Backward recomputes act(gate).
"""

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gelu_tanh_sigmoid(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gc, s, 1 - s) with gelu_tanh(g) = g * s, s = sigmoid(2y), y = k (gc + c gc^3): the exact identity
    1 + tanh(y) = 2 sigmoid(2y), without the cancellation of 1 + tanh(y) where tanh(y) -> -1."""
    k, c = math.sqrt(2 / math.pi), 0.044715
    gc = g.clamp(-100, 100)
    y2 = 2 * k * (gc + c * gc**3)
    return gc, torch.sigmoid(y2), torch.sigmoid(-y2)


def activation_reference(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(g)
    if activation == "gelu_tanh":
        return g * _gelu_tanh_sigmoid(g)[1]
    if activation == "gelu":
        return F.gelu(g, approximate="none")
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def activation_derivative_reference(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    if activation == "gelu_tanh":
        # d/dg [g s] = s + g * 2 s (1 - s) * k (1 + 3 c g^2), with 1 - s = sigmoid(-2y)
        k, c = math.sqrt(2 / math.pi), 0.044715
        gc, s, one_minus_s = _gelu_tanh_sigmoid(g)
        return s + 2 * g * s * one_minus_s * k * (1 + 3 * c * gc * gc)
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(g / math.sqrt(2)))
        return cdf + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def glu_forward_reference(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    ct = _compute_dtype(gate.dtype)
    return (activation_reference(gate.to(ct), activation) * up.to(ct)).to(gate.dtype)


def glu_backward_reference(
    grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    ct = _compute_dtype(gate.dtype)
    g, u, dout = gate.to(ct), up.to(ct), grad_out.to(ct)
    grad_gate = dout * u * activation_derivative_reference(g, activation)
    grad_up = dout * activation_reference(g, activation)
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype)
