"""Reference RMSNorm over head_dim of q and k followed by their rotary embedding (Qwen3 / Gemma3 attention).

What transformers computes, one op after the other, for x in (q, k) laid out [B, T, H, D]:

    n   = rms_norm(x, weight, eps)                 (fastkern.reference.rms_norm: llama or gemma form,
                                                    rounded to x's dtype as the module returns it)
    out = rotate(n, cos, sin)                      (fastkern.reference.rope on the leading rotary_dim
                                                    elements, fp32 math, rounded once to x's dtype)

Backward is the chain rule through the two: the incoming gradient is rotated by the transpose
(``transpose=True``), then RMSNorm's backward takes it, with the forward's rstd (one per token and head).
In float64 every rounding is exact and this is the function itself, which is what the tests compare to.
The Triton kernel (fastkern/kernels/rope_qk_norm.py) keeps the normalised value in fp32 between the two
steps; this reference rounds it, as the two separate modules do.
"""

from __future__ import annotations

import torch

from .rms_norm import rms_norm_backward_reference, rms_norm_reference
from .rope import rotate_reference


def _rotate_bthd(x, cos, sin, position_ids, interleaved, transpose):
    # rotate_reference reads [B, H, T, D] (cos/sin broadcast over heads); ours is [B, T, H, D].
    return rotate_reference(x.transpose(1, 2), cos, sin, position_ids, interleaved, transpose).transpose(1, 2)


def norm_rotate_reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                          weight_offset: float = 0.0, cast_before_weight: bool = True,
                          position_ids: torch.Tensor | None = None,
                          interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, T, H, D] contiguous in x's dtype, rstd [B, T, H] in the compute dtype) for one of q, k."""
    normed, rstd = rms_norm_reference(x, weight, eps, weight_offset, cast_before_weight)
    out = _rotate_bthd(normed, cos, sin, position_ids, interleaved, False)
    return out.contiguous(), rstd.reshape(x.shape[:-1])


def norm_rotate_backward_reference(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                   rstd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                   weight_offset: float = 0.0, cast_before_weight: bool = True,
                                   position_ids: torch.Tensor | None = None, interleaved: bool = False,
                                   need_weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx in x's dtype, dweight in weight's dtype or None) for one of q, k."""
    grad_normed = _rotate_bthd(grad_out, cos, sin, position_ids, interleaved, True)
    dx, dw = rms_norm_backward_reference(grad_normed, x, weight, rstd.reshape(-1), weight_offset, cast_before_weight,
                                         need_weight_grad)
    return dx.contiguous(), dw


def rope_qk_norm_reference(q, k, q_weight, k_weight, cos, sin, eps, weight_offset=0.0, cast_before_weight=True,
                           position_ids=None, interleaved=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_out, k_out): q_norm then rope on q, k_norm then rope on k, as new tensors."""
    opts = (eps, weight_offset, cast_before_weight, position_ids, interleaved)
    return (norm_rotate_reference(q, q_weight, cos, sin, *opts)[0],
            norm_rotate_reference(k, k_weight, cos, sin, *opts)[0])
