"""Public differentiable ops. Each dispatches per call to a Triton kernel, the Triton interpreter or a
PyTorch reference (see fastkern.runtime) and is registered as a torch custom op."""

from .glu import geglu, swiglu
from .rope import rope

__all__ = ["rope", "swiglu", "geglu"]
