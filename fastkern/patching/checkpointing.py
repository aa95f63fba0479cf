"""Checkpointing patcher: decoder layers recompute in backward, their saved inputs wait in CPU memory.

How transformers 5 checkpoints (5.17 and 5.23 agree on what matters here): decoder layers are
``GradientCheckpointingLayer`` instances; while a layer's ``gradient_checkpointing`` flag is on and the
model is training, the layer calls ``self._gradient_checkpointing_func(partial(<layer call>, **kwargs),
*args)`` (5.17 wraps ``__call__``, 5.23 wraps ``forward``; both read the attribute at call time).
``PreTrainedModel._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)``
sets the flag and that attribute on every module; ``gradient_checkpointing_enable`` (5.17; a deprecated
alias in 5.23), ``activation_checkpointing_enable`` (5.23), transformers' Trainer and TRL all end there.

So, per model instance, ``patch_model(model, checkpointing="offload")``:

1. gives each PreTrainedModel inside ``model`` an instance-level ``_set_gradient_checkpointing`` that
   swaps the function it is handed for an :class:`OffloadRecomputeFunction` (the recompute checkpoint
   with offloaded inputs; an :class:`OffloadCheckpointFunction` where only the non-reentrant form is the
   same checkpoint) over the model's own :class:`~fastkern.offload.ActivationOffloader`, keeping the
   checkpoint keyword arguments (``context_fn`` from TRL's selective checkpointing,
   ``preserve_rng_state``, ...). Checkpointing turned on later by the user, by the Trainer (TRL turns
   it on by default) or re-enabled by TRL around generation therefore offloads too;
2. turns checkpointing on now if no layer has it (through that setter), or swaps the
   function of the layers that already checkpoint.

unpatch_model puts the setters and every layer's function back, and if patch_model was the one that
turned checkpointing on (and nobody enabled it since), restores the flags as they were.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..offload import ActivationOffloader
from .checkpoint_functions import (
    _ANCHOR,
    OffloadCheckpointFunction,
    OffloadRecomputeFunction,
    RecomputeCheckpointFunction,
    _offloading,
    _recomputing,
)
from .context import PatchContext
from .report import PatchReport

_KIND = "checkpointing"
RECOMPUTE = "recompute"
# Keys of the dict form ``checkpointing={"offload": True, "host_bytes": N}``; each but "offload" is an
# ActivationOffloader argument.
_DICT_KEYS = ("offload", "host_bytes", "host_fraction", "min_bytes")


def _offloader_kwargs(value) -> dict | None:
    """The option's value -> ActivationOffloader keyword arguments (None: not offloading, i.e. None or
    "recompute"); ValueError if bad."""
    if value is None or value == "offload" or value == RECOMPUTE:
        return {} if value == "offload" else None
    if not isinstance(value, dict):
        raise ValueError(
            f"fastkern.patch_model: checkpointing must be None, \"recompute\", \"offload\" or a dict like "
            f"{{\"offload\": True, \"host_bytes\": 64 << 30}}, got {value!r}"
        )
    unknown = sorted(set(value) - set(_DICT_KEYS), key=str)
    if unknown:
        raise ValueError(f"fastkern.patch_model: checkpointing: unknown keys {unknown}; expected some of {_DICT_KEYS}")
    if value.get("offload") is not True:
        raise ValueError(
            "fastkern.patch_model: checkpointing as a dict needs \"offload\": True (offloading is the only "
            f"checkpointing fastkern patches), got {value!r}"
        )
    kwargs = {k: v for k, v in value.items() if k != "offload"}
    try:
        ActivationOffloader(**kwargs)  # validates the values with the offloader's own messages
    except ValueError as exc:
        raise ValueError(f"fastkern.patch_model: checkpointing: {exc}") from None
    return kwargs


class _GradientStop(torch.autograd.Function):
    """Identity in forward (a view, no copy); backward passes nothing on. Its output requires grad through
    ``_ANCHOR`` while nothing upstream receives a gradient."""

    @staticmethod
    def forward(ctx, anchor, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None, None


def _input_grads_requested(owners) -> bool:
    """transformers' ``enable_input_require_grads`` is active on one of ``owners`` (TRL calls it for every
    PEFT model it trains with gradient checkpointing)."""
    return any(getattr(m, "_require_grads_hooks", None) or getattr(m, "_require_grads_hook", None) for m in owners)


def _embedding_output_hook(owners, module, args, output):
    """Forward hook on a frozen input embedding: hand the decoder a differentiable non-leaf instead of the
    leaf ``enable_input_require_grads`` makes.

    That hook calls ``output.requires_grad_(True)`` so that reentrant checkpoints see an input that needs
    a gradient. The output is then a leaf, and autograd's gradient accumulator for it keeps the [T, H]
    tensor on the device through the whole backward (whatever the checkpoint offloaded) and writes a
    [T, H] ``.grad`` into it at the end, for a tensor nobody can read. ``_GradientStop`` gives the same
    "requires grad" to the layers with nothing held: its graph ends at ``_ANCHOR``. The embedding is
    frozen (the output has no ``grad_fn``), so no parameter loses a gradient. Hooks run in the order they
    were registered: if transformers' ran first the output is already a leaf that requires grad (an
    embedding's own forward never makes one) and is replaced; if ours runs first, it replaces the output
    only while ``enable_input_require_grads`` is active, and theirs then finds a tensor that already
    requires grad."""
    # Dynamo cannot read ``grad_fn`` while tracing, and a compiled region has its own autograd graph.
    if torch.compiler.is_compiling() or not isinstance(output, torch.Tensor) or not torch.is_grad_enabled():
        return None
    if output.grad_fn is not None or not (output.requires_grad or _input_grads_requested(owners)):
        return None
    return _GradientStop.apply(_ANCHOR, output.detach())


class _PatchState:
    """One patched model's checkpointing: offloading (an ActivationOffloader) or recompute (none)."""

    def __init__(self, offloader_kwargs: dict | None = None, recompute: bool = False):
        self.offloader = None if recompute else ActivationOffloader(**(offloader_kwargs or {}))
        self.enabled_by_patch = False
        self.enabled_since_patch = False
        self.saved_flags: dict[nn.Module, dict] = {}  # module -> the two attributes as they were
        self.embedding_hooks: list = []  # handles of _embedding_output_hook, removed by unpatch_model

    def swap(self, func):
        return _recomputing(func) if self.offloader is None else _offloading(self.offloader, func)

    def owns(self, func) -> bool:
        if self.offloader is None:
            return type(func) is RecomputeCheckpointFunction
        return isinstance(func, (OffloadCheckpointFunction, OffloadRecomputeFunction)) and func.offloader is self.offloader


class _OffloadingSetter:
    """Instance-level stand-in for ``PreTrainedModel._set_gradient_checkpointing``."""

    def __init__(self, model: nn.Module, state: _PatchState, previous):
        self.model, self.state, self.previous = model, state, previous

    def __call__(self, enable: bool = True, gradient_checkpointing_func=torch_checkpoint, **kwargs):
        if enable:
            gradient_checkpointing_func = self.state.swap(gradient_checkpointing_func)
            self.state.enabled_since_patch = True
        setter = self.previous or type(self.model)._set_gradient_checkpointing.__get__(self.model)
        return setter(enable=enable, gradient_checkpointing_func=gradient_checkpointing_func, **kwargs)


def _pretrained_models(model: nn.Module) -> list[nn.Module]:
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def _patch_state(model: nn.Module) -> _PatchState | None:
    for m in _pretrained_models(model):
        setter = m.__dict__.get("_set_gradient_checkpointing")
        if isinstance(setter, _OffloadingSetter):
            return setter.state
    return None


def model_offloader(model: nn.Module) -> ActivationOffloader | None:
    """The ActivationOffloader patch_model gave ``model`` (its pool and ``stats``), or None if not offloading."""
    state = _patch_state(model)
    return state.offloader if state is not None else None


def _snapshot(module: nn.Module) -> dict:
    return {k: module.__dict__[k] for k in ("gradient_checkpointing", "_gradient_checkpointing_func") if k in module.__dict__}


class CheckpointingPatcher:
    def apply(self, ctx: PatchContext, value) -> None:
        offloader_kwargs = _offloader_kwargs(value)
        if offloader_kwargs is None and value != RECOMPUTE:
            return
        hf = ctx.hf_model
        if hf is None:
            return
        if not getattr(hf, "supports_gradient_checkpointing", False):
            ctx.report.add_skipped("", _KIND, f"{type(hf).__name__} does not support gradient checkpointing")
            return
        if _patch_state(ctx.model) is not None:
            ctx.report.add_skipped("", _KIND, "already patched")
            return
        from transformers.modeling_layers import GradientCheckpointingLayer

        owners = _pretrained_models(ctx.model)
        old_format = [type(m).__name__ for m in owners
                      if "value" in inspect.signature(type(m)._set_gradient_checkpointing).parameters]
        if old_format:
            ctx.report.add_skipped("", _KIND, f"{old_format} use the pre-4.35 checkpointing format; not patched")
            return
        names = {m: n for n, m in ctx.model.named_modules()}
        layers = [m for m in ctx.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not layers:
            ctx.report.add_skipped("", _KIND, "no GradientCheckpointingLayer in the model")
            return
        state = _PatchState(offloader_kwargs, recompute=value == RECOMPUTE)
        for m in owners:
            m._set_gradient_checkpointing = _OffloadingSetter(m, state, m.__dict__.get("_set_gradient_checkpointing"))
        if state.offloader is None:
            self._apply_recompute(ctx, state, layers, names)
            return
        # Only when offloading: a recompute checkpoint keeps layer 0's input (the embedding output) anyway.
        self._hook_embeddings(ctx, state, owners, names)
        if any(layer.gradient_checkpointing for layer in layers):
            for m in ctx.model.modules():
                if hasattr(m, "gradient_checkpointing") and hasattr(m, "_gradient_checkpointing_func"):
                    m._gradient_checkpointing_func = state.swap(m._gradient_checkpointing_func)
            how = "checkpointing was on; its function now offloads"
        else:
            state.saved_flags = {m: _snapshot(m) for m in ctx.model.modules() if hasattr(m, "gradient_checkpointing")}
            hf._set_gradient_checkpointing(
                enable=True, gradient_checkpointing_func=functools.partial(torch_checkpoint, use_reentrant=False)
            )
            state.enabled_by_patch = True
            how = "checkpointing turned on"
        state.enabled_since_patch = False
        for layer in layers:
            if layer.gradient_checkpointing:
                form = ("recomputed in backward (reentrant)" if isinstance(layer._gradient_checkpointing_func,
                                                                        OffloadRecomputeFunction)
                        else "non-reentrant checkpoint")
                ctx.report.add_patched(names[layer], _KIND,
                                       f"{type(layer).__name__}: inputs offloaded to CPU memory, {form}; {how}")
            else:
                ctx.report.add_skipped(names[layer], _KIND, "not checkpointed (every_n_layers)")
        ctx.report.notes.append(
            "checkpointing: gradient_checkpointing_enable()/activation_checkpointing_enable() on this model "
            "(by you, the Trainer or TRL) keep offloading until unpatch_model"
        )
        # Resolved now, so the budget reflects the RAM available when the model is patched.
        budget = state.offloader.host_budget()
        source = ("host_bytes" if state.offloader.host_bytes is not None
                  else f"{state.offloader.host_fraction:g} of the RAM available now")
        ctx.report.notes.append(
            f"checkpointing: offloaded inputs may use {budget / 2**30:.2f} GiB of host memory ({source}); past "
            "that they stay on the device, counted in model_offloader(model).stats.bytes_kept_on_device"
        )

    @staticmethod
    def _hook_embeddings(ctx: PatchContext, state: _PatchState, owners, names) -> None:
        seen = set()
        for m in owners:
            try:
                embedding = m.get_input_embeddings()
            except (AttributeError, NotImplementedError):
                continue
            if not isinstance(embedding, nn.Module) or id(embedding) in seen:
                continue
            seen.add(id(embedding))
            state.embedding_hooks.append(embedding.register_forward_hook(functools.partial(_embedding_output_hook, owners)))
            ctx.report.add_patched(names.get(embedding, ""), _KIND, f"{type(embedding).__name__}: a frozen embedding's "
                                   "output reaches the layers as a differentiable non-leaf, so enable_input_require_grads "
                                   "keeps no [T, H] leaf and gradient alive through backward")

    @staticmethod
    def _apply_recompute(ctx: PatchContext, state: _PatchState, layers, names) -> None:
        """Checkpointing stays as the model, the Trainer or TRL set it: on or off, never turned on here.
        Layers that checkpoint now get the recompute function; the setter gives it to those turned on later."""
        for m in ctx.model.modules():
            if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
                m._gradient_checkpointing_func = state.swap(m._gradient_checkpointing_func)
        for layer in layers:
            func = layer.__dict__.get("_gradient_checkpointing_func")
            if not layer.gradient_checkpointing:
                continue
            if state.owns(func):
                ctx.report.add_patched(names[layer], _KIND, f"{type(layer).__name__}: recomputed in backward "
                                       "(reentrant: forward without autograd)")
            else:
                ctx.report.add_skipped(names[layer], _KIND, f"checkpoint function {func!r} kept (reentrant already, "
                                       "or arguments only torch's non-reentrant checkpoint has)")
        ctx.report.notes.append(
            "checkpointing: \"recompute\" leaves checkpointing on or off as it is; whenever it is on (turned on by "
            "you, the Trainer or TRL, now or later), decoder layers run forward without autograd and recompute in "
            "backward; a layer whose output is `residual + mlp(x)` (read from its first rerun's graph) skips the "
            "MLP's down projection GEMM in later reruns (its output values are never read)"
        )

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        state = _patch_state(model)
        if state is None:
            return
        for m in _pretrained_models(model):
            setter = m.__dict__.get("_set_gradient_checkpointing")
            if isinstance(setter, _OffloadingSetter) and setter.state is state:
                if setter.previous is None:
                    del m.__dict__["_set_gradient_checkpointing"]
                else:
                    m.__dict__["_set_gradient_checkpointing"] = setter.previous
        from transformers.modeling_layers import GradientCheckpointingLayer

        turn_off = state.enabled_by_patch and not state.enabled_since_patch
        for name, m in model.named_modules():
            func = m.__dict__.get("_gradient_checkpointing_func")
            if turn_off and m in state.saved_flags:
                for key in ("gradient_checkpointing", "_gradient_checkpointing_func"):
                    m.__dict__.pop(key, None)
                m.__dict__.update(state.saved_flags[m])
            elif state.owns(func):
                m._gradient_checkpointing_func = func.replaces
            else:
                continue
            if isinstance(m, GradientCheckpointingLayer):
                report.add_patched(name, _KIND, "checkpointing turned back off" if turn_off else "original checkpoint function restored")
        for handle in state.embedding_hooks:
            handle.remove()
        state.embedding_hooks.clear()
        if state.offloader is not None:
            state.offloader.empty_cache()


CHECKPOINTING_PATCHER = CheckpointingPatcher()
