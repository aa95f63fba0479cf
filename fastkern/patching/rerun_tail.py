"""A decoder layer's rerun in backward without its last GEMM (``checkpointing="recompute"`` / ``"offload"``).

The reentrant checkpoint reruns a layer in backward to rebuild its graph; the rerun's output is only
the root backward starts from. When a layer ends ``out = residual + mlp(x)`` and the MLP is
fastkern's (patching/mlp.py), the down projection's output values are never read: the add's backward
needs none, the projection's backward needs its input and weight. The rerun then skips that GEMM
(fastkern/ops/unused_output.py): per layer 2 * tokens * hidden * intermediate FLOPs, about a sixth of
the rerun's work in a Llama-shaped layer, and one projection call less of host work. torch's
non-reentrant checkpoint gets the same saving by stopping its recomputation early; the reentrant form
(chosen for its host savings) could not, until this.

Whether a layer ends that way is read from the rerun's own graph, per layer instance, not assumed
from the family: the first rerun of a layer computes everything and records the node of its patched
MLP's output; the layer qualifies when exactly one patched MLP call produced a node and the layer's
output is an add whose inputs include that node directly (a post-MLP norm as in Gemma 2/3 or OLMo 2,
a scale, a clamp, a shared expert summed first: each puts another node there and the layer never
skips). Every later rerun that skips checks the same again and raises if it no longer holds (its
output would be built on unread values; a layer's structure does not change between calls, so this
is a guard, not a path). A skip is not tried while anything could see the skipped values: forward
hooks on the MLP or its down projection, global forward hooks, or forward hooks on the layer other
than transformers' output-capturing hooks (installed on every decoder layer, inactive outside a
model forward's capture context, so never active in backward). Not checked: a layer forward that
stores its MLP's output on a module during the rerun would store unset values (no transformers family
does; the stored value would be a recomputed copy of one the forward already stored).
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn as nn
from torch.nn.modules import module as nn_module

from ..ops.unused_output import linear_output_unused, request

# Attribution switch for benchmarks (bench/e2e/sft.py's "fastkern-full-rerun"): False reruns every layer
# in full, as before this module existed.
SKIP_LAST_PROJECTION = True


class _Rerun(threading.local):
    mode = None  # None outside a rerun, else "record" or "skip"
    nodes = None  # the grad_fn of each patched MLP output in this rerun


state = _Rerun()
_verdicts: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _transformers_capture_hook(hook) -> bool:
    return getattr(hook, "__name__", "") == "output_capturing_hook" and (
        getattr(hook, "__module__", "") or "").startswith("transformers.")


def _layer_hooks_allow(layer: nn.Module) -> bool:
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    hooks = layer._forward_hooks
    return not hooks or all(_transformers_capture_hook(h) for h in hooks.values())


def _ends_in_add_of(out, nodes: list) -> bool:
    if len(nodes) != 1 or nodes[0] is None or not isinstance(out, torch.Tensor):
        return False
    fn = out.grad_fn
    return fn is not None and fn.name() == "AddBackward0" and any(n is nodes[0] for n, _ in fn.next_functions)


def rerun(layer: nn.Module | None, function, *args):
    """``function(*args)``, the rerun of ``layer`` in a reentrant checkpoint's backward (autograd on),
    skipping its last projection when the layer qualifies (module docstring)."""
    verdict = None if layer is None else _verdicts.get(layer)
    if layer is None or verdict is False or not SKIP_LAST_PROJECTION or not _layer_hooks_allow(layer):
        return function(*args)
    mode = "skip" if verdict else "record"
    previous = state.mode, state.nodes
    state.mode, state.nodes = mode, []
    try:
        out = function(*args)
        nodes = state.nodes
    finally:
        state.mode, state.nodes = previous
    ends = _ends_in_add_of(out, nodes)
    if mode == "record":
        _verdicts[layer] = ends
    elif not ends:
        raise RuntimeError(
            f"fastkern: the rerun of {type(layer).__name__} skipped its MLP's down projection, but the layer's "
            "output no longer ends in `residual + mlp(x)`; its gradients would read unset values. Please "
            "report this; patch_model(model, checkpointing=False) avoids the rerun.")
    return out


def layer_skips(layer: nn.Module) -> bool | None:
    """Whether ``layer``'s reruns skip the last projection (None: not rerun yet)."""
    return _verdicts.get(layer)


def last_projection(mlp: nn.Module, down: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``down(h)`` inside a rerun (patching/mlp.py calls ``down`` itself when ``state.mode`` is None):
    recorded, and with its product skipped where the rerun skips (module docstring)."""
    if state.mode is None or not torch.is_grad_enabled():
        return down(h)
    if state.mode == "skip" and not (mlp._forward_hooks or down._forward_hooks or down._forward_pre_hooks):
        out = _skipped(down, h)
    else:
        out = down(h)
    state.nodes.append(out.grad_fn)
    return out


def _skipped(down: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if down.__class__ is nn.Linear:
        params = down._parameters
        weight, bias = params["weight"], params["bias"]
        device_type = h.device.type
        # Under autocast F.linear would cast; the skip computes only where it would not.
        if (weight.dtype == h.dtype and (bias is None or bias.dtype == h.dtype) and weight.device == h.device
                and (not torch.is_autocast_enabled(device_type)
                     or torch.get_autocast_dtype(device_type) == h.dtype)):
            return linear_output_unused(h, weight, bias)
        return down(h)
    # A patched PEFT LoRA layer takes the request into its lora_linear call (ops/unused_output.py); any
    # other module, or a LoRA call that goes to PEFT's forward, computes its output as usual.
    request.pending = True
    try:
        return down(h)
    finally:
        request.pending = False
