"""Which SDPA backend a patched attention call prefers.

``torch.nn.functional.scaled_dot_product_attention`` picks the first backend of a fixed priority list
that accepts the inputs; the order differs between torch versions (torch 2.11 chooses cuDNN for the
training shapes on an H100, docs/e2e.md). On Hopper (compute capability 9.x) cuDNN's attention kernels accept
the training shapes (bf16/fp16, causal, no mask, head_dim up to 128, GQA) and
are reported faster for fwd+bwd. ``preferred_backends(q, implementation)`` gives the context that puts
cuDNN first for one call, as a *priority* (``sdpa_kernel(..., set_priority=True)``): a call cuDNN cannot
take falls through to FlashAttention, memory-efficient and math exactly as it would unpatched. The choice
is per call and per patched module: nothing process-wide changes, other models keep torch's order.

``PREFER_CUDNN`` is the switch, off: on an H100 with torch 2.11 SDPA already chooses cuDNN for these calls,
and the per-call context measured no faster end to end (docs/e2e.md; benchmarks set it around their steps).
"""

from __future__ import annotations

import contextlib
import functools

import torch

PREFER_CUDNN = False

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.MATH]
except ImportError:  # a torch without sdpa_kernel: nothing to prefer
    sdpa_kernel = None


@functools.lru_cache(maxsize=None)
def _is_hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def preferred_backends(q: torch.Tensor, implementation: str):
    """A context for one attention call: cuDNN first where it applies (switch on, transformers' "sdpa"
    implementation, a CUDA Hopper tensor in bf16/fp16, not inside torch.compile), else a no-op."""
    if (not PREFER_CUDNN or sdpa_kernel is None or implementation != "sdpa" or not q.is_cuda
            or q.dtype not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling()
            or not _is_hopper(q.device.index if q.device.index is not None else torch.cuda.current_device())):
        return contextlib.nullcontext()
    return sdpa_kernel(_ORDER, set_priority=True)
