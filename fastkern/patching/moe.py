"""MoE experts patcher: the routed experts' loop over experts -> fastkern.ops.moe_experts (grouped GEMMs).

The section ``[moe_experts]`` of a family file names the experts class (transformers 5: one module
holding every expert's weights as stacked 3-D parameters, called as
``experts(hidden_states [N, H], top_k_index [N, K], top_k_weights [N, K])``), its fused gate/up weight
[E, 2I, H] (the gate's I rows first), its down weight [E, H, I] and its activation attribute. Only the
experts' forward is replaced: the router, its top-k and normalisation, the shared expert and the
load-balancing loss run as transformers runs them.

Validation, per experts module found in the model:
  1. the spec's class resolves in the installed transformers (else a spec problem);
  2. the instance has the weights and act_fn the spec names, with the shapes above;
  3. the layout flags transformers' ``use_experts_implementation`` sets, where present, are the plain
     ones (concatenated gate|up, not transposed, no bias, gated): gpt-oss's interleaved, transposed,
     biased experts do not qualify;
  4. act_fn computes silu on a grid of points;
  5. PEFT does not target the module's parameters (LoRA on 3-D expert weights, ``target_parameters``):
     those modules keep their forward, with a report line;
  6. the patched forward is compared with the class's own per-expert loop on a small random routing.

At call time the patched forward defers to the class forward when PEFT has parametrized the weights
since (its LoRA delta lives in the parametrization) or when the input dtype differs from the weights'
(autocast): both give the original's result.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..ops.moe_experts import moe_experts
from .context import PatchContext, instance_forward
from .mlp import detect_activation
from .report import PatchReport

_REQUIRED_KEYS = ("class", "gate_up", "down", "act", "activation")
# The flags transformers' use_experts_implementation decorator sets on the instance, with the values the
# kernels' layout needs. Versions without a flag are taken to have the plain layout (checked by the probe).
_PLAIN_LAYOUT = {"is_concatenated": True, "is_transposed": False, "has_bias": False, "has_gate": True,
                 "has_post_expert_norm": False}
_PROBE_TOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _class_forward(module: nn.Module):
    return type(module).forward


@instance_forward("moe")
def grouped_moe_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    gate_up_name, down_name = self._fastkern_moe
    gate_up, down = getattr(self, gate_up_name), getattr(self, down_name)
    if parametrize.is_parametrized(self) or hidden_states.dtype != gate_up.dtype:
        return _class_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    return moe_experts(hidden_states, top_k_index, top_k_weights, gate_up, down)


def _eager_forward(module: nn.Module):
    """The class's own per-expert loop: the forward transformers' decorator wraps (it dispatches on
    config._experts_implementation, and grouped_mm has no float64 kernel), else the class forward."""
    fwd = _class_forward(module)
    return getattr(fwd, "__wrapped__", fwd)


def _probe(module: nn.Module, names: tuple[str, str]) -> str | None:
    gate_up, down = getattr(module, names[0]), getattr(module, names[1])
    if gate_up.device.type == "meta":
        return "skip-probe: parameters on the meta device"
    n_experts, _, hidden = gate_up.shape
    k = min(2, n_experts)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(5, hidden, generator=gen, device="cpu").to(device=gate_up.device, dtype=gate_up.dtype)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(5)]).to(gate_up.device)
    w = torch.rand(5, k, generator=gen, device="cpu").to(device=gate_up.device, dtype=gate_up.dtype)
    with torch.no_grad(), torch.device(gate_up.device):
        try:
            expected = _eager_forward(module)(module, x, ids, w)
        except Exception as exc:  # an original that cannot run here (a dtype without a kernel): not probed
            return f"skip-probe: the original forward failed ({type(exc).__name__})"
        got = moe_experts(x, ids, w, gate_up, down)
    expected, got = expected.double(), got.double()
    err = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    tol = _PROBE_TOL.get(gate_up.dtype, 1e-2)
    if not err <= tol:  # also catches NaN
        return f"patched forward differs from {type(module).__name__}.forward: relative error {err:.2e} > {tol:.0e}"
    return None


def _layout_problem(module: nn.Module, names: tuple[str, str]) -> str | None:
    odd = [f"{flag}={getattr(module, flag)!r}" for flag, plain in _PLAIN_LAYOUT.items()
           if hasattr(module, flag) and getattr(module, flag) != plain]
    if odd:
        return f"experts layout {', '.join(odd)}; the kernels take concatenated, untransposed, unbiased gate|up"
    gate_up, down = getattr(module, names[0]), getattr(module, names[1])
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return f"{names[0]} / {names[1]} are not tensors"
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] % 2 or tuple(down.shape) != (
            gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2):
        return (f"{names[0]} {tuple(gate_up.shape)} and {names[1]} {tuple(down.shape)} are not [E, 2I, H] and "
                "[E, H, I]")
    if gate_up.dtype != down.dtype or not gate_up.dtype.is_floating_point:
        return f"weights of dtypes {gate_up.dtype} and {down.dtype}; the kernels take one floating dtype"
    return None


def _peft_targeted(model: nn.Module) -> set[int]:
    """ids of the modules whose parameters a PEFT ParamWrapper (LoRA on nn.Parameter) wraps."""
    targeted = set()
    for module in model.modules():
        if type(module).__name__ == "ParamWrapper" and hasattr(module, "base_layer"):
            base = module.base_layer
            while type(base).__name__ == "ParamWrapper":  # several parameters of one module: nested wrappers
                base = base.base_layer
            targeted.add(id(base))
    return targeted


class MoEExpertsPatcher:
    def apply(self, ctx: PatchContext, value) -> None:
        classes = ctx.section_classes("moe_experts", _REQUIRED_KEYS, "MoE experts")
        if not classes:
            return
        peft_targeted = _peft_targeted(ctx.model)
        probed: dict[tuple[type, torch.dtype], str | None] = {}
        for name, module in ctx.named_modules():
            section = classes.get(type(module))
            if section is None:
                continue
            names = (section["gate_up"], section["down"])
            absent = [n for n in (*names, section["act"]) if not hasattr(module, n)]
            if absent:
                ctx.report.add_skipped(name, "moe", f"{type(module).__name__} has no attribute(s) {absent}")
                continue
            if id(module) in peft_targeted or parametrize.is_parametrized(module):
                ctx.report.add_skipped(name, "moe", "PEFT LoRA targets the expert parameters (target_parameters); "
                                                    "transformers' forward runs them")
                continue
            problem = _layout_problem(module, names)
            if problem:
                ctx.report.add_skipped(name, "moe", problem)
                continue
            if section["activation"] != "silu" or detect_activation(getattr(module, section["act"])) != "silu":
                ctx.report.add_skipped(name, "moe", f"{section['act']} is not silu; the kernels fuse SwiGLU only")
                continue
            key = (type(module), getattr(module, names[0]).dtype)
            if key not in probed:
                probed[key] = _probe(module, names)
            n_experts = getattr(module, names[0]).shape[0]
            detail = f"{type(module).__name__} -> fastkern.ops.moe_experts (grouped GEMMs over {n_experts} experts)"
            ctx.replace_forward_probed(module, name, grouped_moe_experts_forward, detail, {"moe": names},
                                       probed[key])

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        # Instance forwards and _fastkern_* attributes are removed generically by unpatch_model.
        return None


MOE_PATCHER = MoEExpertsPatcher()
