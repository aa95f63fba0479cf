"""LoRA patcher (option ``lora``): PEFT LoRA layers over nn.Linear or bitsandbytes NF4 Linear4bit run
fastkern.ops.lora_linear (no separate passes for the LoRA term; NF4 dequantized by fastkern's kernel).

Patch time: every PEFT ``lora.Linear`` / ``lora.bnb.Linear4bit`` whose configuration can be fused
gets an instance forward; the rest (fp4 bases, DoRA and other variants, lora_bias, hooked bases)
are reported as skipped with the reason.

Call time: the patched forward re-reads PEFT's state (adapters disabled, merged adapters, the
active adapters, ``scaling`` and each adapter's dropout/variant) on every call, and hands the call to
PEFT's own forward whenever the fused result would not be exactly PEFT's math (adapters disabled or
merged: PEFT's forward is the base layer then; ``adapter_names`` or extra arguments; active dropout;
variants; dtype or device mismatches; forward hooks added to the base layer after patching; autocast
unless it would run the layer in x's dtype anyway, as TRL's bf16=True does on a bf16 model). So TRL's
``disable_adapter()`` and ``set_scale`` keep working unchanged, with no cache to invalidate. This
forward runs for every LoRA projection of every layer, and its host time adds up at small batch
sizes: it reads the attributes PEFT's properties return (``_disable_adapters``, ``merged_adapters``,
``_active_adapter``; integrations/peft.py) and the ModuleDicts' own ``_modules`` / ``_parameters``
instead of calling properties and Module.__getattr__, and makes one Python call on the common path
(``_one_plain_adapter``) before :func:`lora_linear`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.modules.module as _module

from ..integrations.peft import (
    active_lora_adapters,
    adapter_blocker,
    base_kind,
    combined_lora,
    lora_layer_classes,
    static_blocker,
)
from ..ops.lora_linear import lora_linear
from ..ops.lora_linear_group import lora_linear_group
from .context import _INSTANCE_FORWARDS, PatchContext, instance_forward
from .report import PatchReport


def _peft_forward(layer, x, *args, **kwargs):
    return type(layer).forward(layer, x, *args, **kwargs)


def _one_plain_adapter(layer: nn.Module):
    """(lora_A weight, lora_B weight, scaling) when exactly one adapter is active and it is plain LoRA
    right now, else None (then the general path decides, with the same checks spelled out).

    The common case of a LoRA training step, read without property or Module.__getattr__ calls (each
    costs about a microsecond): ``_active_adapter`` is what PEFT's ``active_adapters`` property reads,
    the ModuleDicts' and Linears' ``_modules`` / ``_parameters`` are where Module.__getattr__ looks.
    Exact-type checks make that reading authoritative (a parametrized or subclassed Linear, or any
    other dropout module, goes to the general path).
    """
    active = layer._active_adapter
    if active.__class__ is str:
        name = active
    elif len(active) == 1:
        name = active[0]
    else:
        return None
    mods = layer._modules
    lin_a, lin_b = mods["lora_A"]._modules.get(name), mods["lora_B"]._modules.get(name)
    if lin_a.__class__ is not nn.Linear or lin_b.__class__ is not nn.Linear:
        return None
    params_a, params_b = lin_a._parameters, lin_b._parameters
    if params_a["bias"] is not None or params_b["bias"] is not None:
        return None
    if name in layer.lora_variant or layer.lora_bias.get(name, False):
        return None
    dropout = mods["lora_dropout"]._modules.get(name)
    cls = dropout.__class__
    if not (cls is nn.Identity or (cls is nn.Dropout and (dropout.p == 0 or not dropout.training))):
        return None
    scaling = layer.scaling.get(name)
    if scaling.__class__ is not float and not isinstance(scaling, (int, float)):
        return None
    return params_a["weight"], params_b["weight"], float(scaling)


def _fusable_now(layer: nn.Module, x) -> list[str] | None:
    """The active adapters to fuse, or None when this call must take PEFT's forward."""
    if layer.disable_adapters or layer.merged or not isinstance(x, torch.Tensor):
        return None
    names = active_lora_adapters(layer)
    if not names or any(adapter_blocker(layer, n) is not None for n in names):
        return None
    return names


# bitsandbytes sets ``packing_format_for_cpu`` on a QuantState when it repacks the weight for its CPU
# kernels, a layout the fused path cannot read. The flag is normally absent, and getattr then runs
# QuantState.__getattr__ (Python) on every QLoRA call. For bitsandbytes' own QuantState, whose
# __getattr__ answers only "bitsandbytes__*" names and whose class does not define the flag, the
# instance __dict__ holds the whole answer; any other class is asked with getattr.
_CPU_PACKED = "packing_format_for_cpu"
_CPU_PACKED_IN_DICT: dict[type, bool] = {}


def _cpu_packed_in_dict(cls: type) -> bool:
    return (cls.__module__ == "bitsandbytes.functional" and cls.__qualname__ == "QuantState"
            and not any(_CPU_PACKED in vars(k) for k in cls.__mro__))


def _nf4_args(base: nn.Module, x: torch.Tensor, lora, compute: torch.dtype, patched_class: bool
              ) -> tuple | None:
    if patched_class:  # the Linear4bit class patched over keeps them where Module.__getattr__ looks
        params = base._parameters
        weight, bias = params["weight"], params["bias"]
    else:
        weight, bias = base.weight, base.bias
    # base_quant_state(base), spelled out with the weight already in hand.
    state = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
    if state is None or state.quant_type != "nf4":
        return None
    cls = state.__class__
    in_dict = _CPU_PACKED_IN_DICT.get(cls)
    if in_dict is None:
        in_dict = _CPU_PACKED_IN_DICT[cls] = _cpu_packed_in_dict(cls)
    if state.__dict__.get(_CPU_PACKED, False) if in_dict else getattr(state, _CPU_PACKED, False):
        return None
    # Params4bit's Python __torch_function__ would run for this read; the device is the plain tensor's.
    with torch._C.DisableTorchFunctionSubclass():
        if weight.device != x.device:
            return None
    if compute not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    a, b, s = lora  # adapters of another float dtype: lora_linear casts them (cached) itself
    if bias is not None and bias.dtype != compute:
        bias = bias.to(compute)
    return compute, weight, a, b, s, bias, state


# Under autocast, the fused path computes what PEFT computes only when x and the compute dtype (x's
# own for a dense base, whose weight is checked to match it; bitsandbytes' compute_dtype for an NF4
# base) are autocast's dtype. TRL's ``bf16=True`` runs the model under autocast (accelerate wraps the
# forward) also when the weights are bf16 already: then autocast casts PEFT's fp32 adapters and its
# fp32 copy of x back to bf16 for each product, i.e. the LoRA term is computed in bf16, as the fused
# path computes it (adapters cast to the compute dtype). With fp32 activations, an fp32 compute dtype
# or another autocast dtype, PEFT's forward runs. NF4 bases take the fused path under autocast too:
# dX leaves lora_linear contiguous, which torch 2.11's cuDNN attention backward needs (a strided dX
# made QLoRA train differently); the fused NF4 layers track fp32 training at least as closely as PEFT
# + bitsandbytes do (docs/nf4_lora.md).


def fused_args(self: nn.Module, x) -> tuple | None:
    """(compute dtype, weight, lora_A, lora_B, scaling, bias, quant_state): the lora_linear call, with x
    cast to the compute dtype and the output cast back to x's dtype, that is exactly PEFT's forward of
    this patched layer for ``x`` right now; None when PEFT's forward must run (module docstring)."""
    # PEFT's ``disable_adapters`` and ``merged`` properties read these two attributes (module docstring).
    if self._disable_adapters or self.merged_adapters or not isinstance(x, torch.Tensor):
        return None
    base = self._modules.get("base_layer")
    # The exact class the layer was patched over (nn.Linear or bitsandbytes' Linear4bit) is its own
    # base; anything else (a nested tuner layer, a swapped base): ask PEFT.
    patched_class = base.__class__ is self._fastkern_lora_base
    if not patched_class:
        base = self.get_base_layer()
    if base._forward_hooks or base._forward_pre_hooks:  # hooks added after patching must run
        return None
    nf4 = self._fastkern_lora == "nf4"
    dtype = x.dtype
    compute = (getattr(base, "compute_dtype", None) or dtype) if nf4 else dtype
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and not (
            dtype == compute and compute == torch.get_autocast_dtype(device_type)):  # see the comment above
        return None
    lora = _one_plain_adapter(self)
    if lora is None:  # several adapters, or one that may not be plain: the full checks
        names = _fusable_now(self, x)
        if names is None:
            return None
        lora = combined_lora(self, names, compute)
    if nf4:
        return _nf4_args(base, x, lora, compute, patched_class)
    if base.__class__ is not nn.Linear:  # the base was swapped after patching
        return None
    params = base._parameters  # authoritative for an exact nn.Linear
    w, bias = params["weight"], params["bias"]
    if w.dtype != dtype or w.device != x.device or (w.requires_grad and torch.is_grad_enabled()):
        return None
    a, b, s = lora  # float32 adapters are passed as they are: lora_linear casts them (cached) itself
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return dtype, w, a, b, s, bias, None


@instance_forward("lora")
def fused_lora_forward(self, x, *args, **kwargs):
    call = None if args or kwargs else fused_args(self, x)
    if call is None:
        return _peft_forward(self, x, *args, **kwargs)
    compute, w, a, b, s, bias, state = call
    if compute is x.dtype:  # a dense base, or an NF4 one computing in x's dtype
        return lora_linear(x, w, a, b, s, bias=bias, quant_state=state)
    out = lora_linear(x.to(compute), w, a, b, s, bias=bias, quant_state=state)
    return out if out.dtype == x.dtype else out.to(x.dtype)


# Attribution switch for benchmarks (bench/e2e/sft.py's "fastkern-separate-projections"): False calls
# every projection as its own module, as before call_projections grouped them.
GROUP_PROJECTIONS = True


def call_projections(modules: tuple[nn.Module, ...], x: torch.Tensor) -> list:
    """``[m(x) for m in modules]`` (an attention's q/k/v, an MLP's gate/up), with the patched LoRA layers
    among them that take the fused path for this call run as one lora_linear_group call: the same
    products, one autograd node instead of one per projection (ops/lora_linear_group.py).

    A layer joins the group only when calling it would run :func:`fused_lora_forward` on the fused path
    with nothing around it: fastkern's LoRA forward bound on it, no hooks of its own and no global
    module hooks (Module.__call__ would run those; the group does not call the module), the compute
    dtype of the first such layer. Every other module is called as usual; with fewer than two in the
    group, all are. Loops rather than comprehensions: this runs for every attention and MLP call.
    """
    grouped, calls = [], []
    if GROUP_PROJECTIONS and not (_module._global_forward_hooks or _module._global_forward_pre_hooks
            or _module._global_backward_hooks or _module._global_backward_pre_hooks):
        compute = None
        for i, module in enumerate(modules):
            if (_INSTANCE_FORWARDS.get(getattr(module.__dict__.get("forward"), "__func__", None)) != "lora"
                    or module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks):
                continue
            call = fused_args(module, x)
            if call is not None and (compute is None or call[0] is compute):
                compute = call[0]
                grouped.append(i)
                calls.append(call[1:])
    if len(grouped) < 2:
        outs = []
        for module in modules:
            outs.append(module(x))
        return outs
    same = compute is x.dtype
    group = lora_linear_group(x if same else x.to(compute), calls)
    outs, j = [], 0
    for i, module in enumerate(modules):
        if j < len(grouped) and grouped[j] == i:
            out = group[j]
            outs.append(out if same or out.dtype == x.dtype else out.to(x.dtype))
            j += 1
        else:
            outs.append(module(x))
    return outs


class LoRAPatcher:
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
            ctx.replace_forward(module, name, fused_lora_forward, detail,
                                {"lora": kind, "lora_base": type(module.get_base_layer())})

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        return None


LORA_PATCHER = LoRAPatcher()
