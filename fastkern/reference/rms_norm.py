"""Reference RMSNorm, in the two forms transformers' model families use.

    rstd = 1 / sqrt(mean(x^2) + eps)            (over the last dim, in fp32; fp64 for fp64 inputs)
    llama form (cast_before_weight=True):  y = weight * round_to_x_dtype(x * rstd)
    gemma form (cast_before_weight=False): y = round_to_x_dtype((x * rstd) * (weight_offset + weight))

LlamaRMSNorm (and Mistral, Qwen2, Qwen3, Phi3) is the first with weight_offset 0: the normalized
input is rounded to the input dtype and then multiplied by the weight (one more rounding). GemmaRMSNorm
(Gemma 1/2/3) is the second with weight_offset 1, everything in fp32 and one rounding at the end.
The output has x's dtype. Backward treats the intermediate rounding as the identity (as autograd
does for ``.to(dtype)``):

    g = dy * (weight_offset + weight);  dx = rstd * (g - xhat * mean(g * xhat));  dweight = sum_rows(dy * xhat')

with xhat = x * rstd and xhat' the rounded xhat in the llama form (what the weight multiplied).
"""

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0,
                       cast_before_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): y with x's shape and dtype, rstd [rows] in the compute dtype."""
    ct = _compute_dtype(x.dtype)
    xc = x.to(ct)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xc * rstd
    w = weight.to(ct) + weight_offset
    if cast_before_weight:
        y = xhat.to(x.dtype).to(ct) * w
    else:
        y = xhat * w
    return y.to(x.dtype), rstd.reshape(-1)


def rms_norm_backward_reference(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                                weight_offset: float = 0.0, cast_before_weight: bool = True,
                                need_weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx in x's dtype, dweight in weight's dtype or None)."""
    ct = _compute_dtype(x.dtype)
    n = x.shape[-1]
    xc = x.to(ct)
    r = rstd.to(ct).reshape(*x.shape[:-1], 1)
    xhat = xc * r
    dy = grad_out.to(ct)
    g = dy * (weight.to(ct) + weight_offset)
    dx = r * (g - xhat * (g * xhat).sum(-1, keepdim=True) / n)
    dweight = None
    if need_weight_grad:
        seen = xhat.to(x.dtype).to(ct) if cast_before_weight else xhat
        rows = x.shape[:-1].numel()  # not -1: that is ambiguous when the rows are 0 wide
        dweight = (dy * seen).reshape(rows, n).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dweight
