"""patch_model / unpatch_model: per-instance, idempotent, reversible patching.

Every change is made on the given model's own module instances (an instance attribute ``forward``
bound to a fastkern function, plus ``_fastkern_*`` attributes holding what that forward needs), so
other models in the process are untouched, ``copy.deepcopy`` carries the patch to the copy, and
unpatching deletes those attributes. The options (names, defaults, accepted values, order) are the
table in options.py; the patchers they drive (one per option) live in sibling modules and share
context.py and probe.py.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

# Re-exported: tests, bench scripts and integrations import these names from core.
from .context import (  # noqa: F401
    _INSTANCE_FORWARDS,
    PatchContext,
    Patcher,
    fastkern_forward_kind,
    instance_forward,
    signed_forward,
)
from .options import OPTIONS, Option, is_off, options_doc, validate
from .report import PatchReport
from .specs import specs_for_model_type


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


def _patchers() -> list[Option]:
    """The options table's rows in application order (each has ``option``, ``apply`` and ``remove``)."""
    return list(OPTIONS)


def patch_model(model: nn.Module, **options: Any) -> PatchReport:
    """Swap fastkern kernels into ``model`` (this instance only) and report what changed.

    Options (keyword [default; accepted values], in the order they are applied; the table is
    fastkern/patching/options.py, ``False`` or ``None`` turns any of them off):
{options}

    Every default is the fastest configuration measured end to end that is at least as accurate as the
    unpatched model against a high-precision reference (docs/e2e.md); pass ``option=False`` to opt out.
    Every given value is checked before anything is patched: an unknown option is a TypeError, a value
    the option does not accept an OptionError (a TypeError and a ValueError), and the model is left as
    it was.

    Works on a transformers PreTrainedModel, a PEFT model wrapping one, or the model a TRL trainer
    holds. Calling it again patches nothing twice; :func:`unpatch_model` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastkern.patch_model: expected a torch.nn.Module, got {type(model).__name__}")
    effective = validate(options)
    hf_model = _find_hf_model(model)
    model_type = _model_type(hf_model)
    specs = specs_for_model_type(model_type)
    report = PatchReport(model=type(model).__name__, family=specs[0].family if specs else None)
    report.options = effective
    if hf_model is None:
        report.notes.append("no transformers PreTrainedModel found inside the model; nothing to patch")
    elif not specs:
        report.notes.append(f"no patch spec for model_type {model_type!r}; nothing patched")
    ctx = PatchContext(model, hf_model, model_type, specs, report)
    for option in OPTIONS:
        value = effective[option.name]
        if not is_off(value):
            option.apply(ctx, value)
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
    for option in OPTIONS:
        option.remove(model, report)
    return report


# Built from the table so help(fastkern.patch_model) lists the defaults and values the code uses.
if patch_model.__doc__ is not None:  # None under python -OO
    patch_model.__doc__ = patch_model.__doc__.format(options=options_doc(indent="      "))
