"""What fastkern needs to know about PEFT's LoRA layers (PEFT 0.21), kept in one place.

A PEFT ``LoraLayer`` keeps per-adapter dicts (lora_A, lora_B, lora_dropout, scaling, lora_variant,
lora_bias) and the flags ``disable_adapters`` / ``merged`` / ``active_adapters`` that TRL and users
toggle at any time, so everything here is read per call. Nothing is imported from PEFT or
bitsandbytes unless they are installed.

The patched forward (patching/lora.py) reads, on its hot path, the instance attributes behind PEFT's
properties rather than the properties: ``_disable_adapters`` (``disable_adapters``),
``merged_adapters`` (``merged`` is ``bool(merged_adapters)``) and ``_active_adapter``
(``active_adapters`` is ``[_active_adapter]`` for a str, else the list itself), plus the dicts
``lora_variant``, ``lora_bias`` and ``scaling``. It is bound only to the exact PEFT classes of
:func:`lora_layer_classes`, which do not override those properties; tests/patching/test_lora.py
checks the correspondence against the installed PEFT.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def lora_layer_classes() -> tuple[type, ...]:
    """PEFT LoRA layer classes fastkern can fuse (the plain and the bitsandbytes-4-bit Linear)."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return ()
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # PEFT defines it only when bitsandbytes is importable
        return (Linear,)
    return (Linear, Linear4bit)


def base_kind(base: nn.Module) -> str | None:
    """"dense" for an exact nn.Linear, "nf4"/"fp4" for a bitsandbytes Linear4bit, else None.

    PEFT wraps a Linear4bit in lora.bnb.Linear4bit on CUDA machines and in the plain lora.Linear
    otherwise (Linear4bit subclasses nn.Linear); the vanilla LoRA math is the same in both.
    """
    if type(base) is nn.Linear:
        return "dense"
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    if isinstance(base, bnb.nn.Linear4bit):
        return "nf4" if getattr(base_quant_state(base), "quant_type", getattr(base, "quant_type", None)) == "nf4" \
            else "fp4"
    return None


def base_quant_state(base: nn.Module):
    """The bitsandbytes QuantState of a Linear4bit base layer (on the weight, or on the module)."""
    return getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)


def static_blocker(layer: nn.Module, kind: str | None) -> str | None:
    """Why this layer can never take the fused path as configured (None if it can)."""
    base = layer.get_base_layer()
    if kind is None:
        return f"base layer is {type(base).__name__}, neither nn.Linear nor bitsandbytes Linear4bit"
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return "base layer has forward hooks or an overridden forward (e.g. accelerate offloading)"
    if kind == "fp4":
        return "bitsandbytes 4-bit quant_type 'fp4': fastkern only has an nf4 kernel (PEFT + bitsandbytes run it)"
    if kind == "nf4" and base_quant_state(base) is None:
        return "Linear4bit without a quant_state (weight not quantized yet)"
    for name in layer.lora_A:
        reason = adapter_blocker(layer, name)
        if reason is not None and "dropout" not in reason:
            return reason
    return None


def adapter_blocker(layer: nn.Module, name: str) -> str | None:
    """Why adapter ``name`` differs from plain ``B(A(x)) * scaling`` right now (None if it does not)."""
    if name in getattr(layer, "lora_variant", {}):
        return f"adapter {name!r} uses a LoRA variant ({type(layer.lora_variant[name]).__name__}, e.g. DoRA)"
    if getattr(layer, "lora_bias", {}).get(name, False) or layer.lora_B[name].bias is not None:
        return f"adapter {name!r} has lora_bias"
    if layer.lora_A[name].bias is not None:
        return f"adapter {name!r}: lora_A has a bias"
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, nn.Identity):
        p = getattr(dropout, "p", None)
        if not isinstance(dropout, nn.Dropout) or (p > 0 and dropout.training):
            return f"adapter {name!r} has active dropout ({dropout})"
    if not isinstance(layer.scaling.get(name), (int, float)):
        return f"adapter {name!r} has a non-numeric scaling"
    return None


def active_lora_adapters(layer: nn.Module) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def combined_lora(layer: nn.Module, names: list[str], dtype: torch.dtype):
    """(A [r, K], B [N, r], scaling) summing the active adapters, in ``dtype``; differentiable.

    Several adapters sum: B1 A1 s1 + B2 A2 s2 = [B1 s1 | B2 s2] [A1; A2], one LoRA of rank r1 + r2.
    """
    if len(names) == 1:
        name = names[0]
        return (layer.lora_A[name].weight.to(dtype), layer.lora_B[name].weight.to(dtype), float(layer.scaling[name]))
    a = torch.cat([layer.lora_A[n].weight.to(dtype) for n in names], dim=0)
    b = torch.cat([layer.lora_B[n].weight.to(dtype) * float(layer.scaling[n]) for n in names], dim=1)
    return a, b, 1.0
