"""The functions a decoder layer calls as ``_gradient_checkpointing_func`` once fastkern patched
checkpointing (``patching/checkpointing.py`` installs them): the reentrant recompute checkpoint, the same
with its inputs offloaded to host memory, and the offloading non-reentrant checkpoint for the cases the
reentrant form cannot stand in for. Each keeps the function it replaced (``replaces``) so that
unpatch_model can put it back.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..offload import ActivationOffloader
from ..ops.lora_linear import reusing_dequantized_weights
from . import rerun_tail
from .replicated import distributed as _distributed, replicated_parameters, rerun_on_copies


class OffloadCheckpointFunction:
    """What a decoder layer calls as ``_gradient_checkpointing_func`` once offloading is on."""

    def __init__(self, offloader: ActivationOffloader, checkpoint_kwargs: dict, replaces):
        self.offloader = offloader
        self.checkpoint_kwargs = checkpoint_kwargs
        self.replaces = replaces  # the function that was asked for; unpatch_model puts it back

    def __call__(self, function, *args, **kwargs):
        if torch.compiler.is_compiling():
            # The offloader's saved-tensor hooks and side stream are not traceable: a traced layer checkpoints
            # as torch does (non-reentrant, which Dynamo captures), its saved inputs staying on the device.
            return torch_checkpoint(function, *args, **{"use_reentrant": False, **self.checkpoint_kwargs, **kwargs})
        return self.offloader.checkpoint(function, *args, **{**self.checkpoint_kwargs, **kwargs})

    def __repr__(self) -> str:
        return f"OffloadCheckpointFunction({self.checkpoint_kwargs}, offloader={self.offloader!r})"


# A leaf that requires grad, handed to every recompute checkpoint as its first input: a reentrant
# checkpoint is an autograd node only if one of its inputs requires grad, and a decoder layer's input
# often does not (frozen embeddings under LoRA); without the anchor its parameters would get no gradient.
# Nothing depends on it, so it never receives a gradient itself.
_ANCHOR = torch.empty(0, requires_grad=True)
# Checkpoint keyword arguments the reentrant implementation honours; any other (context_fn from TRL's
# selective checkpointing, determinism_check, debug) exists only in the non-reentrant one.
_REENTRANT_KWARGS = ("preserve_rng_state",)


def _without_anchor(function, anchor, *args):
    if torch.is_grad_enabled():
        # The rerun in backward (the first call runs with autograd off): every op's backward follows
        # within this layer, so NF4 LoRA calls may keep their 16-bit weights for it (ops/lora_linear.py),
        # and a layer ending in `residual + mlp(x)` may skip its last GEMM (rerun_tail.py).
        with reusing_dequantized_weights():
            return rerun_tail.rerun(_layer_of(function), function, *args)
    return function(*args)


def _requires_grad(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(_requires_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_requires_grad(v) for v in value.values())
    return False


def _layer_of(function):
    """The module a decoder layer's checkpointed call belongs to, or None. transformers up to 5.17 passes
    ``partial(super().__call__, **kwargs)`` (a bound method), later versions ``partial(forward, layer,
    **kwargs)`` (the class's forward, so that module hooks stay outside the checkpoint)."""
    if isinstance(function, functools.partial):
        if function.args and isinstance(function.args[0], nn.Module):
            return function.args[0]
        function = function.func
    owner = getattr(function, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


class RecomputeCheckpointFunction:
    """What a decoder layer calls as ``_gradient_checkpointing_func`` with ``checkpointing="recompute"``.

    torch's reentrant checkpoint: the layer's forward runs with autograd off (no graph, nothing saved but
    the layer's inputs) and backward reruns it with autograd on, then backpropagates through the rerun.
    The non-reentrant checkpoint transformers and TRL ask for builds the graph in forward and routes every
    tensor autograd saves through Python hooks, three times per tensor (save, recompute, unpack): per
    decoder layer that is most of the host's Python work (bench/host_ops.py: 2413 -> 1048 Python calls per
    patched LoRA layer). The math is the same, op for op.

    Falls back to the function it replaced, per call, where the reentrant form is not equivalent or not
    safe: under torch.compile, with autograd off, in a distributed run whose parameters are not plain
    replicated ones (see patching/replicated.py), with a tensor that requires grad inside the layer's keyword arguments
    (a reentrant checkpoint differentiates only its positional inputs), or for a frozen layer whose input
    does not require grad (nothing to differentiate). ``torch.autograd.grad`` through a reentrant
    checkpoint raises torch's own error ("torch.utils.checkpoint is incompatible with .grad()"); ``.backward()``,
    which every trainer uses, is what it supports.
    """

    def __init__(self, checkpoint_kwargs: dict, replaces):
        self.checkpoint_kwargs = checkpoint_kwargs
        self.replaces = replaces  # the function that was asked for; unpatch_model puts it back
        self.fallback = replaces  # what runs where the reentrant form is not the same checkpoint

    def __call__(self, function, *args, **kwargs):
        if kwargs or torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return self.fallback(function, *args, **kwargs)
        if isinstance(function, functools.partial) and _requires_grad(function.keywords):
            return self.fallback(function, *args)
        if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            layer = _layer_of(function)
            if layer is None or not any(p.requires_grad for p in layer.parameters()):
                return self.fallback(function, *args)
        if _distributed():
            layer = _layer_of(function)
            parameters = None if layer is None else replicated_parameters(layer)
            if parameters is None:
                return self.fallback(function, *args)
            run = functools.partial(_without_anchor, function)
            return self._reentrant(functools.partial(rerun_on_copies, run, layer, parameters, 1 + len(args)),
                                   _ANCHOR, *args, *parameters)
        return self._reentrant(functools.partial(_without_anchor, function), _ANCHOR, *args)

    def _reentrant(self, function, *args):
        return torch_checkpoint(function, *args, use_reentrant=True, **self.checkpoint_kwargs)

    def __repr__(self) -> str:
        return f"RecomputeCheckpointFunction({self.checkpoint_kwargs})"


class OffloadRecomputeFunction(RecomputeCheckpointFunction):
    """``checkpointing="offload"`` where the reentrant form applies: :class:`RecomputeCheckpointFunction`
    (the layer's forward without autograd, rerun in backward) with the layer's inputs held in host memory
    by the model's offloader until the rerun (``ActivationOffloader.recompute``). The same saved tensors
    as the offloading non-reentrant checkpoint (the layer inputs) without that checkpoint's per-tensor
    hooks on everything the layer computes. Where the reentrant form does not apply, the call goes to
    the non-reentrant offloading checkpoint (:class:`OffloadCheckpointFunction`), so inputs are offloaded
    either way."""

    def __init__(self, offloader: ActivationOffloader, checkpoint_kwargs: dict, replaces, fallback):
        super().__init__(checkpoint_kwargs, replaces)
        self.offloader = offloader
        self.fallback = fallback

    def _reentrant(self, function, *args):
        # When no argument would leave the device (all below the offloader's min_bytes, e.g. short sequences
        # under checkpointing={"offload": True, "min_bytes": 256 << 20}), the call is the default recompute
        # checkpoint itself, without the offloader's hooks: such layers cost what they cost without offload.
        if not any(isinstance(t, torch.Tensor) and self.offloader.would_offload(t) for t in args):
            return super()._reentrant(function, *args)
        return self.offloader.recompute(function, *args, **self.checkpoint_kwargs)

    def __repr__(self) -> str:
        return f"OffloadRecomputeFunction({self.checkpoint_kwargs}, offloader={self.offloader!r})"


def _checkpoint_kwargs(func) -> dict | None:
    """Keyword arguments ``func`` gives torch's checkpoint, or None if offloading cannot stand in for it."""
    base, kwargs = (func.func, dict(func.keywords)) if isinstance(func, functools.partial) else (func, {})
    # transformers' offload=True wraps torch's checkpoint in save_on_cpu; ours replaces both.
    is_transformers_offload = getattr(base, "__module__", "") == "transformers.modeling_utils" and getattr(
        base, "__name__", "") == "checkpoint_func"
    if base is not torch_checkpoint and not is_transformers_offload:
        return None
    if kwargs.pop("use_reentrant", False):
        return None
    return kwargs


def _offloading(offloader: ActivationOffloader, func):
    """``func`` as an OffloadRecomputeFunction where the recompute form is the same checkpoint, else as an
    OffloadCheckpointFunction; as is (with a warning) if it is not torch's non-reentrant checkpoint."""
    if isinstance(func, (OffloadCheckpointFunction, OffloadRecomputeFunction)):
        if func.offloader is offloader:
            return func
        func = func.replaces
    offloading = _offloading_nonreentrant(offloader, func)
    if not isinstance(offloading, OffloadCheckpointFunction) or set(offloading.checkpoint_kwargs) - set(_REENTRANT_KWARGS):
        return offloading  # context_fn (TRL's selective checkpointing) and the like: non-reentrant only
    return OffloadRecomputeFunction(offloader, dict(offloading.checkpoint_kwargs), replaces=func, fallback=offloading)


def _offloading_nonreentrant(offloader: ActivationOffloader, func):
    kwargs = _checkpoint_kwargs(func)
    if kwargs is None:
        warnings.warn(
            f"fastkern checkpointing='offload': the requested checkpoint function {func!r} is reentrant or not "
            "torch.utils.checkpoint; it is kept as is and saved inputs stay on the device",
            RuntimeWarning,
            stacklevel=3,
        )
        return func
    return OffloadCheckpointFunction(offloader, kwargs, replaces=func)


def _recomputing(func):
    """``func`` as a RecomputeCheckpointFunction where that is the same checkpoint; else ``func`` as is:
    already reentrant, another checkpoint function (transformers' offload=True among them: replacing it
    would drop its offloading), or keyword arguments only the non-reentrant form has."""
    if type(func) is RecomputeCheckpointFunction:
        return func
    base, kwargs = (func.func, dict(func.keywords)) if isinstance(func, functools.partial) else (func, {})
    if base is not torch_checkpoint or kwargs.pop("use_reentrant", False) or set(kwargs) - set(_REENTRANT_KWARGS):
        return func
    return RecomputeCheckpointFunction(kwargs, replaces=func)
