"""Does SDPA's backward take a strided grad_out correctly under activation checkpointing? (GPU)

    python3 bench/probe_sdpa_strided_grad.py

Until 2026-12-03 the [W | B] scheme of lora_linear's NF4 backward returned dX as a view with row
stride K + r; from a QLoRA o_proj that view is the attention's grad_out. This compares q/k/v
gradients for a strided vs a contiguous grad_out of equal values, with and without non-reentrant
checkpointing, for each SDPA backend. Measured on an H200 with torch 2.11: cuDNN 140% off for the
strided one (also torch's default pick there), flash and math exact (docs/nf4_lora.md).
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

B, H, HK, T, D, R = 2, 32, 8, 1024, 64, 16


def attention(q, k, v):
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return o.transpose(1, 2).reshape(B, T, H * D)


def grads(leaves, grad_out, checkpointed):
    ls = [t.detach().clone().requires_grad_() for t in leaves]
    out = checkpoint(attention, *ls, use_reentrant=False) if checkpointed else attention(*ls)
    out.backward(grad_out)
    return [t.grad.float() for t in ls]


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, HK, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, HK, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    wide = torch.randn(B * T, H * D + R, device="cuda", dtype=torch.bfloat16, generator=g)
    strided = wide[:, :H * D].view(B, T, H * D)
    contiguous = strided.contiguous()
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH, None):
        try:
            with sdpa_kernel(backend) if backend is not None else torch.enable_grad():
                ref = grads((q, k, v), contiguous, False)
                for ckpt in (False, True):
                    got = grads((q, k, v), strided, ckpt)
                    same = grads((q, k, v), contiguous, ckpt)
                    err = [(a - b).norm().item() / b.norm().item() for a, b in zip(got, ref)]
                    err_c = [(a - b).norm().item() / b.norm().item() for a, b in zip(same, ref)]
                    print(f"{str(backend):32s} checkpoint={ckpt!s:5s} strided grad_out: rel err q/k/v "
                          + " ".join(f"{e:.1e}" for e in err) + " | contiguous: " + " ".join(f"{e:.1e}" for e in err_c),
                          flush=True)
        except RuntimeError as exc:
            print(f"{backend}: not available ({str(exc).splitlines()[0][:80]})")


if __name__ == "__main__":
    main()
