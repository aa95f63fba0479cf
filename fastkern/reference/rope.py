"""Reference rotary embedding of q and k, math in fp32 (fp64 for fp64 inputs).

The same formulas as fastkern/kernels/rope.py written with torch ops: out = x * cos + rot(x) * sin on
the leading ``rotary_dim`` elements of each head, the rest passed through; ``transpose=True`` is the
backward (the rotation by -theta for transformers' cos/sin layout).
"""

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pair_indices(rotary_dim: int, interleaved: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (a, b) of the element pairs rotated together."""
    pair = torch.arange(rotary_dim // 2, device=device)
    if interleaved:
        return 2 * pair, 2 * pair + 1
    return pair, pair + rotary_dim // 2


def gather_cos_sin(cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None):
    """cos/sin as [B or 1, 1, T, R]: per-token tensors unsqueezed, or table rows picked by position_ids."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    return cos.unsqueeze(1), sin.unsqueeze(1)


def rotate_reference(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    interleaved: bool = False,
    transpose: bool = False,
) -> torch.Tensor:
    """One tensor x [B, H, T, D]; returns a new tensor of x's dtype. rotary_dim = cos.shape[-1]."""
    ct = _compute_dtype(x.dtype)
    cos, sin = gather_cos_sin(cos.to(ct), sin.to(ct), position_ids)
    rotary_dim = cos.shape[-1]
    ia, ib = pair_indices(rotary_dim, interleaved, x.device)
    xf = x.to(ct)
    xa, xb = xf[..., ia], xf[..., ib]
    ca, cb, sa, sb = cos[..., ia], cos[..., ib], sin[..., ia], sin[..., ib]
    if transpose:
        ya, yb = xa * ca + xb * sb, xb * cb - xa * sa
    else:
        ya, yb = xa * ca - xb * sa, xb * cb + xa * sb
    out = xf.clone()
    out[..., ia] = ya
    out[..., ib] = yb
    return out.to(x.dtype)


def rope_reference(q, k, cos, sin, position_ids=None, interleaved=False, transpose=False):
    """(q_out, k_out) as new tensors."""
    return (rotate_reference(q, cos, sin, position_ids, interleaved, transpose),
            rotate_reference(k, cos, sin, position_ids, interleaved, transpose))
