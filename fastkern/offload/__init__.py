"""Gradient checkpointing whose saved inputs wait in CPU memory, copied on a side stream.

pool.py        HostBufferPool: the pinned host buffers and the host-RAM budget they stay under
offloader.py   ActivationOffloader: the saved-tensor hooks, side-stream copies out and back, prefetch
checkpoint.py  offload_checkpoint (torch's checkpoint with offloaded inputs) and its default offloader

Design and numbers: docs/offload_checkpointing.md. The patcher that turns it on for a transformers
model (``patch_model(model, checkpointing="offload")``) is fastkern/patching/checkpointing.py.
"""

from .checkpoint import default_offloader, offload_checkpoint
from .offloader import DEFAULT_HOST_FRACTION, DEFAULT_MIN_BYTES, ActivationOffloader, OffloadStats
from .pool import HOST_RESERVE_BYTES, HostBufferPool

__all__ = [
    "ActivationOffloader",
    "HostBufferPool",
    "OffloadStats",
    "offload_checkpoint",
    "default_offloader",
    "DEFAULT_MIN_BYTES",
    "DEFAULT_HOST_FRACTION",
    "HOST_RESERVE_BYTES",
]
