"""The reentrant checkpoint (checkpointing.py) under DDP: the layer's parameters pass through it.

``checkpointing="recompute"`` and ``"offload"`` run a decoder layer's forward without autograd and rerun
it in backward. DDP with ``find_unused_parameters=True`` (what transformers' Trainer picks for a PEFT
model) walks the autograd graph after forward; the layer's parameters are not in it, so DDP would mark
them ready at once and then see their gradients arrive from the rerun ("Expected to mark a variable
ready only once"). Two steps make the reentrant form right there (docs/multi_gpu.md):

1. the layer's trainable parameters become extra inputs of the checkpoint, so DDP's walk finds them;
2. the rerun computes with the checkpoint's detached copies of them in their module slots, so their
   gradients leave the checkpoint as its input gradients and reach each parameter's own accumulation
   once (passing them alone is not enough: autograd would still run each parameter's accumulation
   with an undefined gradient, and DDP's hook on it would fire a second time).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def distributed() -> bool:
    """A process group of more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def replicated_parameters(layer: nn.Module) -> tuple | None:
    """The layer's trainable parameters (each once) when every one is a plain replicated
    ``nn.Parameter`` (DDP, ZeRO-1/2); None for anything else (FSDP2's DTensors, FSDP1's flattened
    parameters, DeepSpeed ZeRO-3's partitioned ones), where the requested checkpoint is kept."""
    held, seen = [], set()
    for p in layer.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        if (type(p) is not nn.Parameter or p._base is not None or hasattr(p, "ds_id")
                or getattr(p, "_fsdp_flattened", False)):
            return None
        seen.add(id(p))
        held.append(p)
    return tuple(held)


def rerun_on_copies(run, layer: nn.Module, parameters: tuple, count: int, *args):
    """The checkpointed call: ``run(*args[:count])``, where ``args[count:]`` are the checkpoint's copies of
    ``parameters``. The first call (autograd off) uses the parameters themselves; the rerun in backward
    puts the copies in their module slots for its duration (restored after it, also on error), so the
    gradients land on the copies, which the checkpoint returns as its input gradients."""
    inputs = args[:count]
    if not torch.is_grad_enabled():
        return run(*inputs)
    copies = {id(p): c for p, c in zip(parameters, args[count:])}
    swapped = []
    try:
        for module in layer.modules():
            slots = module._parameters
            for name, p in slots.items():
                copy = None if p is None else copies.get(id(p))
                if copy is not None:
                    slots[name] = copy
                    swapped.append((slots, name, p))
        return run(*inputs)
    finally:
        for slots, name, p in swapped:
            slots[name] = p
