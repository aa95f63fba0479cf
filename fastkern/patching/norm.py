"""RMSNorm patcher: every RMSNorm module of the family's class -> fastkern.ops.rms_norm.

What it buys is memory more than time: transformers' RMSNorm saves an fp32 copy of its input for
backward (four per Qwen3 layer), the op saves the input itself and one fp32 rstd per row
(docs/trainers.md, "Where GRPO's remaining memory is").

Validation, per RMSNorm class found in the model:
  1. the spec's class resolves in the installed transformers (else a spec problem);
  2. the spec's ``form`` is "llama" (weight * normed.to(dtype)), "gemma" ((1 + weight) in fp32) or
     "olmo" (weight in fp32)
     and the instance has ``weight`` and the spec's eps attribute (``eps`` may list several names, the
     first the instance has is read: a class that renamed the attribute between transformers releases);
  3. the patched forward is compared with the class forward on a random input in the module's
     dtype, forward and backward; a mismatch (transformers changed the norm) skips the class with
     the measured error in the report.
At call time the llama form falls back to the class forward when the input's dtype differs from
the weight's (transformers then promotes the output dtype, which the op does not).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..ops.rms_norm import rms_norm
from .context import PatchContext, instance_forward
from .probe import ProbeVerdict, meta_skip, probe_generator, run_probe, tolerance
from .report import PatchReport

_REQUIRED_KEYS = ("class", "form", "eps")
# (weight_offset, cast_before_weight). llama: weight * normed.to(dtype); gemma: ((1 + weight) * normed) in
# fp32, then cast; olmo: (weight * normed) in fp32, then cast (OLMo 2/3, gpt-oss).
_FORMS = {"llama": (0.0, True), "gemma": (1.0, False), "olmo": (0.0, False)}


@instance_forward("norm")
def fused_rms_norm_forward(self, hidden_states):
    eps_name, weight_offset, cast_before_weight = self._fastkern_norm
    if cast_before_weight and hidden_states.dtype != self.weight.dtype:
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, getattr(self, eps_name), weight_offset=weight_offset,
                    cast_before_weight=cast_before_weight)


def _probe_run(module: nn.Module, patched: bool, x, dy, config: tuple):
    """(output, grad x, grad weight) of one forward and backward on a private copy of the module (the real
    one is left untouched, and its weight may be frozen)."""
    eps_name, weight_offset, cast_before_weight = config
    copy_ = copy.deepcopy(module)
    copy_.weight.requires_grad_(True)
    xr = x.clone().requires_grad_()
    if patched:
        y = rms_norm(xr, copy_.weight, getattr(copy_, eps_name), weight_offset=weight_offset,
                     cast_before_weight=cast_before_weight)
    else:
        y = type(module).forward(copy_, xr)
    return (y, *torch.autograd.grad(y, (xr, copy_.weight), dy))


def _probe(module: nn.Module, config: tuple) -> ProbeVerdict:
    """Whether the patched forward and its gradients match the class forward's on a random input."""
    weight = module.weight
    if (skip := meta_skip(weight)) is not None:
        return skip
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    gen = probe_generator()
    x = torch.randn(4, weight.shape[0], generator=gen, device="cpu").to(device=weight.device, dtype=dtype)
    dy = torch.randn(4, weight.shape[0], generator=gen, device="cpu").to(device=weight.device, dtype=dtype)
    return run_probe(module, lambda: _probe_run(module, False, x, dy, config),
                     lambda: _probe_run(module, True, x, dy, config), tolerance("norm", dtype),
                     names=("output", "grad x", "grad weight"), grad=True)


def _eps_names(section) -> list[str]:
    return [section["eps"]] if isinstance(section["eps"], str) else list(section["eps"])


def _check_section(section) -> str | None:
    if section["form"] not in _FORMS:
        return f"form {section['form']!r} is not one of {sorted(_FORMS)}"
    eps = section["eps"]
    if not (isinstance(eps, str) or (isinstance(eps, list) and eps and all(isinstance(n, str) for n in eps))):
        return f"eps must be an attribute name or a non-empty list of them, got {eps!r}"
    return None


class NormPatcher:
    def apply(self, ctx: PatchContext, value) -> None:
        classes = ctx.section_classes("norm", _REQUIRED_KEYS, "norms", check=_check_section)
        probed: dict[tuple[type, torch.dtype], ProbeVerdict] = {}
        for name, module in ctx.named_modules():
            section = classes.get(type(module))
            if section is None:
                continue
            weight = getattr(module, "weight", None)
            eps_name = next((n for n in _eps_names(section) if hasattr(module, n)), None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps_name is None:
                wanted = " or ".join(repr(n) for n in _eps_names(section))
                ctx.report.add_skipped(name, "norm", f"{type(module).__name__} has no 1-D weight or no {wanted}")
                continue
            config = (eps_name, *_FORMS[section["form"]])
            key = (type(module), weight.dtype)
            if key not in probed:
                probed[key] = _probe(module, config)
            detail = f"{type(module).__name__} -> rms_norm ({section['form']} form)"
            ctx.replace_forward_probed(module, name, fused_rms_norm_forward, detail, {"norm": config}, probed[key])

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        # Instance forwards and _fastkern_* attributes are removed generically by unpatch_model.
        return None


NORM_PATCHER = NormPatcher()
