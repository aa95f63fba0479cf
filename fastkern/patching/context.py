"""What patchers share: the patch context and the registry of fastkern instance forwards (the
patch-time probes they share are in probe.py).

Patchers (mlp.py, norm.py, ...) import this module and the API (core.py) imports the patchers through
the options table (options.py); this module imports no patcher, so the dependencies run one way:
core -> options -> patchers -> context -> probe.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch.nn as nn

from .probe import ProbeVerdict
from .report import PatchReport
from .specs import FamilySpec


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


def output_dropout_problem(module: nn.Module, attribute: str | None) -> str | None:
    """Why the attribute a spec's ``output_dropout`` names does not hold a dropout probability, or None
    (also None when the spec names none)."""
    if attribute is None:
        return None
    value = getattr(module, attribute)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return None
    return f"{attribute} = {value!r} is not a dropout probability in [0, 1]"


def fastkern_forward_kind(module: nn.Module) -> str | None:
    """The patcher kind whose forward is bound on this instance, or None."""
    fwd = module.__dict__.get("forward")
    return _INSTANCE_FORWARDS.get(getattr(fwd, "__func__", None))


class Patcher(Protocol):
    """What an option drives (see options.py, which names each option, its default and its checks)."""

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
                               verdict: ProbeVerdict) -> bool:
        """``replace_forward`` after a probe (probe.py): a mismatch skips the module with its reason; ok
        and not_probed patch, the latter saying so in the detail."""
        if verdict.skips:
            self.report.add_skipped(name, _INSTANCE_FORWARDS[fn], verdict.reason)
            return False
        return self.replace_forward(module, name, fn, verdict.annotate(detail), state)
