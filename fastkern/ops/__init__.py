"""Public differentiable ops. Each dispatches per call to a Triton kernel, the Triton interpreter or a
PyTorch reference (see fastkern.runtime) and is registered as a torch custom op (lora_linear_group is
lora_linear's calls on one input as one eager autograd node; torch.compile sees lora_linear's op)."""

from .glu import geglu, swiglu
from .lora_linear import lora_linear
from .lora_linear_group import lora_linear_group
from .nf4 import NF4State, nf4_dequantize, nf4_quantize
from .linear_cross_entropy import fused_linear_cross_entropy
from .linear_logprobs import fused_linear_logprobs
from .moe_experts import moe_experts
from .rms_norm import rms_norm
from .rope import rope
from .rope_qk_norm import rope_qk_norm
# The two below have no Triton kernel of their own: document_attention is composed of torch's attention
# kernels, tiled_mlp runs a module's own forward over token tiles.
from .document_attention import document_attention
from .tiled_mlp import tiled_mlp

__all__ = ["fused_linear_cross_entropy", "fused_linear_logprobs", "rms_norm", "rope", "rope_qk_norm", "swiglu", "geglu",
           "lora_linear", "lora_linear_group",
           "nf4_dequantize", "nf4_quantize", "NF4State", "document_attention", "tiled_mlp",
           "moe_experts"]
