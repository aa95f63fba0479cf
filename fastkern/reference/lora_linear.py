"""Reference LoRA linear: y = x @ W.T + bias + scaling * (x @ A.T) @ B.T, in plain PyTorch.

W is a dense [N, K] weight, or NF4-packed bytes with a quant state (dequantized here with the
reference dequantizer, so the reference needs neither Triton nor bitsandbytes). Autograd through
these ops is the ground truth for the fused op's gradients.
"""

from __future__ import annotations

import torch

from .nf4 import block_scales_reference, nf4_dequantize_reference


def dense_weight_reference(weight, quant, dtype) -> torch.Tensor:
    """W as a dense [N, K] tensor in ``dtype``; ``quant`` is None or a fastkern.ops.nf4.FlatNF4."""
    if quant is None:
        return weight.to(dtype)
    rows, cols = quant.rows_cols
    scales = block_scales_reference(quant.absmax, quant.nested_blocksize, quant.code2, quant.absmax2, quant.offset)
    w = nf4_dequantize_reference(quant.packed, quant.code, scales, quant.blocksize, rows, cols, quant.dtype)
    return w.to(dtype)


def lora_linear_reference(x, weight, lora_a, lora_b, scaling: float, bias=None, quant=None) -> torch.Tensor:
    w = dense_weight_reference(weight, quant, x.dtype)
    out = x @ w.T + scaling * ((x @ lora_a.T) @ lora_b.T)
    if bias is not None:
        out = out + bias
    return out
