"""patch_model / unpatch_model: per-instance, idempotent, reversible patching.

Every change is made on the given model's own module instances (an instance attribute ``forward``
bound to a fastkern function, plus ``_fastkern_*`` attributes holding what that forward needs), so
other models in the process are untouched, ``copy.deepcopy`` carries the patch to the copy, and
unpatching deletes those attributes. Patchers (one per option) live in sibling modules.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch.nn as nn

from .report import PatchReport
from .specs import FamilySpec, specs_for_model_type

# fastkern functions installed as instance forwards, mapped to the patcher kind that owns them.
_INSTANCE_FORWARDS: dict[Callable, str] = {}


def instance_forward(kind: str):
    """Register ``fn(self, *args, **kwargs)`` as a forward fastkern may bind onto module instances."""

    def register(fn):
        _INSTANCE_FORWARDS[fn] = kind
        return fn

    return register


def _parameters_of(signature: inspect.Signature) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@functools.cache
def signed_forward(fn: Callable, cls: type) -> Callable:
    """``fn`` as bound on instances of ``cls``: the same code, presenting ``cls.forward``'s signature.

    Code reads ``inspect.signature(module.forward)`` to decide what to pass (transformers' generate and
    Trainer pick inputs and dataset columns by parameter name), so a fastkern forward must show the
    parameters of the forward it stands in for, not its own ``(self, *args, **kwargs)``. A bound method
    cannot carry attributes, so where the parameters differ this is a copy of ``fn`` (one per class:
    families' forwards differ) with ``__signature__`` set; where they agree it is ``fn`` itself.
    """
    try:
        signature = inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return fn
    if _parameters_of(signature) == _parameters_of(inspect.signature(fn)):
        return fn
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__module__ = fn.__module__
    copy.__doc__ = getattr(cls.forward, "__doc__", None) or fn.__doc__
    copy.__signature__ = signature
    _INSTANCE_FORWARDS[copy] = _INSTANCE_FORWARDS[fn]
    return copy


def fastkern_forward_kind(module: nn.Module) -> str | None:
    """The patcher kind whose forward is bound on this instance, or None."""
    fwd = module.__dict__.get("forward")
    return _INSTANCE_FORWARDS.get(getattr(fwd, "__func__", None))


class Patcher(Protocol):
    option: str  # keyword of patch_model
    default: Any

    def apply(self, ctx: "PatchContext", value: Any) -> None: ...

    def remove(self, model: nn.Module, report: PatchReport) -> None: ...


@dataclass
class PatchContext:
    model: nn.Module  # what the user passed (PeftModel, TRL-wrapped model, plain HF model)
    hf_model: nn.Module | None  # the transformers PreTrainedModel inside it
    model_type: str | None
    specs: list[FamilySpec]
    report: PatchReport

    def section(self, name: str) -> list[tuple[FamilySpec, dict]]:
        return [(s, s.sections[name]) for s in self.specs if name in s.sections]

    def section_classes(self, name: str, required: tuple[str, ...], what: str, check=None) -> dict[type, dict]:
        """{transformers class: its [name] section} over the model's specs. A section missing a
        required key, failing ``check`` (a function returning why, or None) or naming a class the
        installed transformers lacks becomes a report problem (``what`` names what stays unpatched)
        instead of an exception. ``class`` may be one name or a list of names."""
        classes = {}
        for spec, section in self.section(name):
            missing = [k for k in required if k not in section]
            problem = f"missing keys {missing}" if missing else (check(section) if check else None)
            if problem:
                self.report.problems.append(f"{spec.source} [{name}]: {problem}")
                continue
            names = section["class"] if isinstance(section["class"], list) else [section["class"]]
            for cls_name in names:
                try:
                    classes[spec.resolve(cls_name)] = section
                except LookupError as exc:
                    self.report.problems.append(f"{exc}; {what} not patched")
        return classes

    def named_modules(self):
        return self.model.named_modules()

    def replace_forward(self, module: nn.Module, name: str, fn: Callable, detail: str, state: dict) -> bool:
        """Bind ``fn`` as ``module.forward`` with ``state`` stored as ``_fastkern_<key>`` attributes."""
        kind = _INSTANCE_FORWARDS[fn]
        current = fastkern_forward_kind(module)
        if current == kind:
            self.report.add_skipped(name, kind, "already patched")
            return False
        if "forward" in module.__dict__:
            owner = getattr(module.__dict__["forward"], "__qualname__", type(module.__dict__["forward"]).__name__)
            self.report.add_skipped(
                name, kind, f"forward already overridden on this instance by {owner} (e.g. an accelerate hook)"
            )
            return False
        for key, value in state.items():
            module.__dict__[f"_fastkern_{key}"] = value
        module.forward = types.MethodType(signed_forward(fn, type(module)), module)
        self.report.add_patched(name, kind, detail)
        return True


    def replace_forward_probed(self, module: nn.Module, name: str, fn: Callable, detail: str, state: dict,
                               verdict: str | None) -> bool:
        """``replace_forward`` after a probe: None (matched) patches; "skip-probe: why" patches and says
        it was not probed; any other verdict (a measured mismatch) skips the module with it."""
        if verdict is not None and not verdict.startswith("skip-probe"):
            self.report.add_skipped(name, _INSTANCE_FORWARDS[fn], verdict)
            return False
        if verdict is not None:
            detail += f" ({verdict.removeprefix('skip-probe: ')}; not probed)"
        return self.replace_forward(module, name, fn, detail, state)


def _find_hf_model(model: nn.Module) -> nn.Module | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return None


def _model_type(hf_model: nn.Module | None) -> str | None:
    config = getattr(hf_model, "config", None)
    return getattr(config, "model_type", None)


def _patchers() -> list[Patcher]:
    from .attention import ATTENTION_PATCHER
    from .checkpointing import CHECKPOINTING_PATCHER
    from .compile import COMPILE_PATCHER
    from .lora import LORA_PATCHER
    from .loss import LOSS_PATCHER
    from .mlp import MLP_PATCHER
    from .norm import NORM_PATCHER
    from .packing import PACKING_PATCHER
    from .tiled_mlp import TILED_MLP_PATCHER  # after MLP_PATCHER: it wraps the fused MLP forward

    return [MLP_PATCHER, NORM_PATCHER, CHECKPOINTING_PATCHER, LORA_PATCHER, ATTENTION_PATCHER, PACKING_PATCHER,
            LOSS_PATCHER, TILED_MLP_PATCHER, COMPILE_PATCHER]


def patch_model(model: nn.Module, **options: Any) -> PatchReport:
    """Swap fastkern kernels into ``model`` (this instance only) and report what changed.

    Options (keyword, default in brackets):
      mlp [True]: fused SwiGLU/GeGLU in the MLP of every supported family.
      norm [True]: RMSNorm modules run fastkern.ops.rms_norm, which saves the input and one fp32 rstd
        per row for backward instead of an fp32 copy of the input. See docs/trainers.md.
      rope [True]: attention modules rotate q and k with the fused in-place fastkern.ops.rope (one
        launch for q and k) instead of transformers' apply_rotary_pos_emb. See docs/rope.md.
      packing [True]: packed (padding-free) batches, as TRL's collators give them (position_ids restarting
        per document, optional cu_seq_lens_*), attend within each document under sdpa and eager, cache on
        or off, without a [T, T] mask; other batches run transformers' own attention. See docs/packing.md.
      lora [True]: PEFT LoRA layers over nn.Linear or bitsandbytes nf4 Linear4bit run fastkern's
        lora_linear when exactly equivalent (else PEFT's own forward). See docs/nf4_lora.md.
      checkpointing [None]: "offload" turns gradient checkpointing on for the decoder layers with their
        saved inputs offloaded to CPU memory on a side stream; gradient_checkpointing_enable() called
        later (by you, the Trainer or TRL) keeps offloading. The pinned host memory is capped at half
        the available RAM (inputs past the cap stay on the GPU); {"offload": True, "host_bytes": N} or
        {"offload": True, "host_fraction": f} sets the cap. See docs/offload_checkpointing.md.
      loss [True]: the *ForCausalLM forward computes its loss with fastkern.ops.fused_linear_cross_entropy
        when given labels, without building logits in a training step (logits None there unless
        return_logits=True; eval and no-grad calls still return them), and TRL 1.16's fused LM head uses
        fastkern.ops.fused_linear_logprobs for it, whether patched before or after the trainer is built.
        See docs/linear_cross_entropy.md.
      tiled_mlp ["auto"]: decoder MLPs run over token tiles when one [tokens, intermediate] activation of
        a call would pass 512 MiB (True: always; an int: above that many tokens). See docs/long_context.md.
      compile [False]: each decoder layer runs through torch.compile (regional compilation, this
        instance's layers only), cutting the host work of host-bound steps. See docs/e2e.md.

    Every default is the fastest configuration measured end to end that is at least as accurate as the
    unpatched model against a high-precision reference (docs/e2e.md); pass ``option=False`` to opt out.

    Works on a transformers PreTrainedModel, a PEFT model wrapping one, or the model a TRL trainer
    holds. Calling it again patches nothing twice; :func:`unpatch_model` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastkern.patch_model: expected a torch.nn.Module, got {type(model).__name__}")
    patchers = _patchers()
    known = {p.option: p for p in patchers}
    unknown = set(options) - set(known)
    if unknown:
        raise TypeError(f"fastkern.patch_model: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    hf_model = _find_hf_model(model)
    model_type = _model_type(hf_model)
    specs = specs_for_model_type(model_type)
    report = PatchReport(model=type(model).__name__, family=specs[0].family if specs else None)
    report.options = {p.option: options.get(p.option, p.default) for p in patchers}
    if hf_model is None:
        report.notes.append("no transformers PreTrainedModel found inside the model; nothing to patch")
    elif not specs:
        report.notes.append(f"no patch spec for model_type {model_type!r}; nothing patched")
    ctx = PatchContext(model, hf_model, model_type, specs, report)
    for patcher in patchers:
        value = report.options[patcher.option]
        if value:
            patcher.apply(ctx, value)
    return report


def unpatch_model(model: nn.Module) -> PatchReport:
    """Restore every module of ``model`` that patch_model changed; report what was restored."""
    hf_model = _find_hf_model(model)
    specs = specs_for_model_type(_model_type(hf_model))
    report = PatchReport(model=type(model).__name__, family=specs[0].family if specs else None, action="unpatch")
    for name, module in model.named_modules():
        kind = fastkern_forward_kind(module)
        if kind is not None:
            del module.__dict__["forward"]
            report.add_patched(name, kind, "original forward restored")
        for key in [k for k in module.__dict__ if k.startswith("_fastkern_")]:
            del module.__dict__[key]
    for patcher in _patchers():
        patcher.remove(model, report)
    return report
