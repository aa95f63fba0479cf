"""offload_checkpoint: the function form of :class:`ActivationOffloader`, with a process default offloader."""

from __future__ import annotations

import threading
from typing import Callable

from .offloader import ActivationOffloader

_DEFAULT_OFFLOADER: ActivationOffloader | None = None
_DEFAULT_LOCK = threading.Lock()


def default_offloader() -> ActivationOffloader:
    """The offloader :func:`offload_checkpoint` uses when none is given (created on first use).

    Code that checkpoints more than one model should give each its own :class:`ActivationOffloader`
    (patch_model does), so pools, statistics and prefetch order stay per model.
    """
    global _DEFAULT_OFFLOADER
    with _DEFAULT_LOCK:
        if _DEFAULT_OFFLOADER is None:
            _DEFAULT_OFFLOADER = ActivationOffloader()
        return _DEFAULT_OFFLOADER


def offload_checkpoint(function: Callable, *args, offloader: ActivationOffloader | None = None, **kwargs):
    """Drop-in for ``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)``
    whose saved tensor arguments wait in pinned CPU memory between forward and backward.

    Copies run on a side stream ordered by events against the current stream; the input of the next
    checkpointed call in backward order is copied back while the current one recomputes. Tensors under
    ``offloader.min_bytes`` (1 MiB by default), parameters and CPU tensors are left in place; recompute,
    RNG state (dropout) and autocast behave exactly as in torch's checkpoint. Only positional tensor
    arguments are offloaded (keyword arguments stay referenced by ``function`` as usual).

    Example::

        offloader = fastkern.offload.ActivationOffloader()   # one per model
        for layer in layers:
            h = fastkern.offload_checkpoint(layer, h, offloader=offloader)
        loss_fn(h).backward()
    """
    return (offloader or default_offloader()).checkpoint(function, *args, **kwargs)
