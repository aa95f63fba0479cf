"""LoRA patcher (option ``lora``): PEFT LoRA layers over nn.Linear or bitsandbytes NF4 Linear4bit run
fastkern.ops.lora_linear (the LoRA term inside the base GEMM; NF4 dequantized by fastkern's kernel).

Patch time: every PEFT ``lora.Linear`` / ``lora.bnb.Linear4bit`` whose configuration can be fused
gets an instance forward; the rest (fp4 bases, DoRA and other variants, lora_bias, hooked bases)
are reported as skipped with the reason.

Call time: the patched forward re-reads ``disable_adapters``, ``merged``, ``active_adapters``,
``scaling`` and each adapter's dropout/variant, and hands the call to PEFT's own forward whenever
the fused result would not be exactly PEFT's math (adapters disabled or merged: PEFT's forward is
the base layer then; ``adapter_names`` or extra arguments; active dropout; variants; dtype or
device mismatches). So TRL's ``disable_adapter()`` and ``set_scale`` keep working unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..integrations.peft import (
    active_lora_adapters,
    adapter_blocker,
    base_kind,
    base_quant_state,
    combined_lora,
    lora_layer_classes,
    static_blocker,
)
from ..ops.lora_linear import lora_linear
from .core import PatchContext, instance_forward
from .report import PatchReport


def _peft_forward(layer, x, *args, **kwargs):
    return type(layer).forward(layer, x, *args, **kwargs)


def _fusable_now(layer: nn.Module, x) -> list[str] | None:
    """The active adapters to fuse, or None when this call must take PEFT's forward."""
    if layer.disable_adapters or layer.merged or not isinstance(x, torch.Tensor):
        return None
    names = active_lora_adapters(layer)
    if not names or any(adapter_blocker(layer, n) is not None for n in names):
        return None
    return names


def _dense_forward(layer, base: nn.Linear, x: torch.Tensor, names: list[str]) -> torch.Tensor | None:
    w = base.weight
    if w.dtype != x.dtype or w.device != x.device or (w.requires_grad and torch.is_grad_enabled()):
        return None
    a, b, s = combined_lora(layer, names, x.dtype)
    bias = None if base.bias is None else base.bias.to(x.dtype)
    return lora_linear(x, w, a, b, s, bias=bias)


def _nf4_forward(layer, base: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor | None:
    state = base_quant_state(base)
    if state is None or state.quant_type != "nf4" or getattr(state, "packing_format_for_cpu", False):
        return None
    if base.weight.device != x.device:
        return None
    compute = base.compute_dtype or x.dtype
    if compute not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    xc = x.to(compute)
    a, b, s = combined_lora(layer, names, compute)
    bias = None if base.bias is None else base.bias.to(compute)
    return lora_linear(xc, base.weight, a, b, s, bias=bias, quant_state=state).to(x.dtype)


@instance_forward("lora")
def fused_lora_forward(self, x, *args, **kwargs):
    names = _fusable_now(self, x) if not args and not kwargs else None
    if names is not None:
        base = self.get_base_layer()
        fused = _nf4_forward if self._fastkern_lora == "nf4" else _dense_forward
        out = fused(self, base, x, names)
        if out is not None:
            return out
    return _peft_forward(self, x, *args, **kwargs)


class LoRAPatcher:
    option = "lora"
    default = True

    def apply(self, ctx: PatchContext, value) -> None:
        classes = lora_layer_classes()
        if not classes:
            return
        for name, module in ctx.named_modules():
            if type(module) not in classes:
                continue
            kind = base_kind(module.get_base_layer())
            reason = static_blocker(module, kind)
            if reason is not None:
                ctx.report.add_skipped(name, "lora", reason)
                continue
            detail = "peft LoRA over nn.Linear -> lora_linear" if kind == "dense" else (
                "peft LoRA over bitsandbytes nf4 Linear4bit -> lora_linear (fastkern NF4 dequant)")
            ctx.replace_forward(module, name, fused_lora_forward, detail, {"lora": kind})

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        return None


LORA_PATCHER = LoRAPatcher()
