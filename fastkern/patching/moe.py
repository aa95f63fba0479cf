"""MoE experts patcher: the routed experts' loop over experts -> fastkern.ops.moe_experts (grouped GEMMs).

The section ``[moe_experts]`` of a family file names the experts class (transformers 5: one module
holding every expert's weights as stacked 3-D parameters, called as
``experts(hidden_states [N, H], top_k_index [N, K], top_k_weights [N, K])``) and describes its layout:

  gate_up, down        the weights: [E, 2I, H] and [E, H, I], or with ``transposed = true`` [E, H, 2I]
                       and [E, I, H] (applied as x @ W, gpt-oss)
  gate_up_order        "concatenated" (default: the gate's I rows first) or "interleaved" (gate row 2j,
                       up row 2j + 1, gpt-oss)
  gate_up_bias, down_bias   the bias attributes, [E, 2I] (gate_up's order) and [E, H]; absent: no bias
  activation           "silu" (silu(gate) * up; ``act`` names the act_fn checked to be silu) or
                       "clamped_swiglu" (gpt-oss; ``alpha`` and ``limit`` name the instance attributes
                       holding its constants, read at each call)

Only the experts' forward is replaced: the router, its top-k and normalisation, the shared expert and
the load-balancing loss run as transformers runs them.

Validation, per experts module found in the model:
  1. the spec's class resolves in the installed transformers and the section is consistent (else a
     spec problem);
  2. the instance has the attributes the spec names, with the shapes above, and no parameter the spec
     leaves out (a bias the section does not name would otherwise get no gradient);
  3. the layout flags transformers' ``use_experts_implementation`` sets, where present, agree with the
     section (is_concatenated, is_transposed, has_bias; gated, no post-expert norm);
  4. silu: act_fn computes silu on a grid of points; clamped_swiglu: alpha and limit are finite numbers;
  5. PEFT's LoRA on the expert parameters (``target_parameters``, PEFT's ParamWrapper) is supported:
     PEFT parametrizes the weights only while its wrapper's forward runs (W + s * B A, one baddbmm per
     weight, cached for the call), the patched forward reads the adapted weights from the module as the
     class forward would and hands them to the grouped kernels, and autograd carries their gradient into
     A and B through PEFT's own parametrization (the same math as PEFT over transformers' forward);
  6. the patched forward is compared with the class's own per-expert loop on a small random routing
     (for clamped_swiglu also on inputs scaled so that the clamps bind).

At call time the patched forward defers to the class forward when a weight carries a parametrization
other than PEFT's LoRA proxies (whatever it computes, the class forward is what it was written for) or
when the input dtype differs from the weights' (autocast): both give the original's result. It also
defers when config._experts_implementation differs from its value at patch time: a later
``model.set_experts_implementation(...)`` is honoured.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..ops.moe_experts import ACTIVATIONS, moe_experts
from .context import PatchContext, instance_forward
from .mlp import detect_activation
from .probe import OK, NotProbed, ProbeVerdict, meta_skip, probe_generator, run_probe, tolerance
from .report import PatchReport

_REQUIRED_KEYS = ("class", "gate_up", "down", "activation")
_ORDERS = ("concatenated", "interleaved")


@dataclass(frozen=True)
class ExpertsLayout:
    """A [moe_experts] section resolved for one experts class (stored on each patched instance)."""

    gate_up: str
    down: str
    gate_up_bias: str | None
    down_bias: str | None
    transposed: bool
    interleaved: bool
    activation: str
    act: str | None  # silu: the act_fn attribute
    alpha: str | None  # clamped_swiglu: the attributes holding alpha and limit
    limit: str | None
    routing_args: tuple[str, str]  # the class forward's names for top_k_index and top_k_weights

    @property
    def biased(self) -> bool:
        return self.gate_up_bias is not None or self.down_bias is not None

    def attributes(self) -> list[str]:
        return [n for n in (self.gate_up, self.down, self.gate_up_bias, self.down_bias, self.act, self.alpha,
                            self.limit) if n is not None]

    def describe(self) -> str:
        parts = [f"{'interleaved' if self.interleaved else 'concatenated'} gate/up"]
        if self.transposed:
            parts.append("transposed weights")
        if self.biased:
            parts.append("biases")
        parts.append("clamped SwiGLU" if self.activation == "clamped_swiglu" else "SwiGLU")
        return ", ".join(parts)


def _section_problem(section: dict) -> str | None:
    activation = section["activation"]
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} is not one of {ACTIVATIONS}"
    has_constants = [k for k in ("alpha", "limit") if section.get(k) is not None]
    if activation == "clamped_swiglu" and len(has_constants) != 2:
        return "activation clamped_swiglu needs `alpha` and `limit` (the attributes holding its constants)"
    if activation == "silu" and has_constants:
        return f"{has_constants} belong to activation clamped_swiglu, not silu"
    if section.get("gate_up_order", "concatenated") not in _ORDERS:
        return f"gate_up_order {section['gate_up_order']!r} is not one of {_ORDERS}"
    if not isinstance(section.get("transposed", False), bool):
        return f"transposed must be true or false, got {section['transposed']!r}"
    return None


def _layout(section: dict, cls: type) -> ExpertsLayout:
    params = list(inspect.signature(cls.forward).parameters)
    routing_args = tuple(params[2:4]) if len(params) >= 4 else ("top_k_index", "top_k_weights")
    clamped = section["activation"] == "clamped_swiglu"
    return ExpertsLayout(
        gate_up=section["gate_up"], down=section["down"], gate_up_bias=section.get("gate_up_bias"),
        down_bias=section.get("down_bias"), transposed=section.get("transposed", False),
        interleaved=section.get("gate_up_order", "concatenated") == "interleaved", activation=section["activation"],
        act=None if clamped else section.get("act"), alpha=section.get("alpha"), limit=section.get("limit"),
        routing_args=routing_args)


def _class_forward(module: nn.Module):
    return type(module).forward


def _grouped(module: nn.Module, layout: ExpertsLayout, hidden_states, top_k_index, top_k_weights):
    gate_up, down = getattr(module, layout.gate_up), getattr(module, layout.down)
    if layout.transposed:  # views: the op reads any strides, and the gradients flow back through them
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate_up_bias = getattr(module, layout.gate_up_bias) if layout.gate_up_bias else None
    down_bias = getattr(module, layout.down_bias) if layout.down_bias else None
    act = {}
    if layout.activation == "clamped_swiglu":
        act = dict(activation="clamped_swiglu", alpha=getattr(module, layout.alpha),
                   limit=getattr(module, layout.limit))
    return moe_experts(hidden_states, top_k_index, top_k_weights, gate_up, down, gate_up_bias, down_bias,
                       interleaved=layout.interleaved, **act)


@instance_forward("moe")
def grouped_moe_experts_forward(self, hidden_states, top_k_index=None, top_k_weights=None, **kwargs):
    layout = self._fastkern_moe
    if kwargs:  # the routing passed by the class forward's own names (gpt-oss: router_indices, routing_weights)
        top_k_index = kwargs.pop(layout.routing_args[0], top_k_index)
        top_k_weights = kwargs.pop(layout.routing_args[1], top_k_weights)
        if kwargs:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword arguments {sorted(kwargs)}")
    gate_up = getattr(self, layout.gate_up)
    # A later set_experts_implementation(...) is the user's choice over the patch: the class forward
    # (transformers' dispatcher) runs what they asked for instead of silently keeping fastkern's kernel.
    if ((parametrize.is_parametrized(self) and not _only_peft_lora(self))
            or hidden_states.dtype != gate_up.dtype
            or _experts_implementation(self) != self._fastkern_moe_experts_implementation):
        return _class_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    return _grouped(self, layout, hidden_states, top_k_index, top_k_weights)


# PEFT's parametrizations of a targeted parameter (peft/tuners/lora/layer.py): W + delta, and
# W + s * lhs @ rhs as one baddbmm. Told by class name so that PEFT stays an optional import.
_PEFT_LORA_PROXIES = ("_LoraParameterProxy", "_LoraFactorsProxy")


def _only_peft_lora(module: nn.Module) -> bool:
    """Every parametrization on ``module`` is one of PEFT's LoRA proxies (active inside ParamWrapper.forward)."""
    return all(type(p).__name__ in _PEFT_LORA_PROXIES and type(p).__module__.startswith("peft.")
               for plist in module.parametrizations.values() for p in plist)


def _experts_implementation(module: nn.Module):
    """config._experts_implementation as transformers' experts dispatcher reads it (None where absent)."""
    return getattr(getattr(module, "config", None), "_experts_implementation", None)


def _eager_forward(module: nn.Module):
    """The class's own per-expert loop: the forward transformers' decorator wraps (it dispatches on
    config._experts_implementation, and grouped_mm has no float64 kernel), else the class forward."""
    fwd = _class_forward(module)
    return getattr(fwd, "__wrapped__", fwd)


def _probe_inputs(module: nn.Module, layout: ExpertsLayout, gen: torch.Generator):
    gate_up = getattr(module, layout.gate_up)
    n_experts = gate_up.shape[0]
    hidden = gate_up.shape[1] if layout.transposed else gate_up.shape[2]
    k = min(2, n_experts)
    x = torch.randn(5, hidden, generator=gen, device="cpu").to(device=gate_up.device, dtype=gate_up.dtype)
    ids = torch.stack([torch.randperm(n_experts, generator=gen, device="cpu")[:k] for _ in range(5)]).to(gate_up.device)
    w = torch.rand(5, k, generator=gen, device="cpu").to(device=gate_up.device, dtype=gate_up.dtype)
    inputs = [(x, ids, w)]
    if layout.activation == "clamped_swiglu":
        # The same tokens scaled so that the largest gate/up pre-activation (bias left out) is 3 x limit:
        # the clamps bind on a share of the values, and a wrong clamp shows.
        weight = gate_up.float() if layout.transposed else gate_up.float().transpose(1, 2)
        peak = torch.einsum("nh,ehj->nej", x.float(), weight).abs().amax().item()
        limit = float(getattr(module, layout.limit))
        if peak > 0 and limit > 0:
            inputs.append(((x.float() * (3 * limit / peak)).to(x.dtype), ids, w))
    return inputs


def _probe(module: nn.Module, layout: ExpertsLayout) -> ProbeVerdict:
    gate_up = getattr(module, layout.gate_up)
    if (skip := meta_skip(gate_up)) is not None:
        return skip
    tol = tolerance("moe", gate_up.dtype)

    def expected(x, ids, w):
        try:
            return _eager_forward(module)(module, x, ids, w)
        except Exception as exc:  # an original that cannot run here (a dtype without a kernel): not probed
            raise NotProbed(f"the original forward failed ({type(exc).__name__})") from exc

    # Every draw on the CPU generator, then moved to the experts' device, whatever the default device (a
    # CUDA default device with a CPU generator is an error in randperm); the clamp scaling records no graph.
    with torch.no_grad():
        inputs = _probe_inputs(module, layout, probe_generator())
    for x, ids, w in inputs:
        verdict = run_probe(module, lambda: expected(x, ids, w), lambda: _grouped(module, layout, x, ids, w), tol)
        if verdict != OK:
            return verdict
    return OK


def _flags_problem(module: nn.Module, layout: ExpertsLayout) -> str | None:
    # The flags transformers' use_experts_implementation decorator sets on the instance, with the values the
    # section describes. Versions without a flag are taken to match (checked by the probe).
    expected = {"is_concatenated": not layout.interleaved, "is_transposed": layout.transposed,
                "has_bias": layout.biased, "has_gate": True, "has_post_expert_norm": False}
    odd = [f"{flag}={getattr(module, flag)!r}" for flag, want in expected.items()
           if hasattr(module, flag) and getattr(module, flag) != want]
    if odd:
        return (f"experts layout {', '.join(odd)}; the [moe_experts] section describes {layout.describe()} "
                "(keys gate_up_order, transposed, gate_up_bias/down_bias), and the kernels take gated experts "
                "without a post-expert norm")
    return None


def _layout_problem(module: nn.Module, layout: ExpertsLayout) -> str | None:
    problem = _flags_problem(module, layout)
    if problem:
        return problem
    gate_up, down = getattr(module, layout.gate_up), getattr(module, layout.down)
    tensors = [gate_up, down] + [getattr(module, n) for n in (layout.gate_up_bias, layout.down_bias) if n]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "the weights and biases the section names are not all tensors"
    if layout.transposed:
        names = "[E, H, 2I] and [E, I, H]"
        ok = gate_up.dim() == 3 and down.dim() == 3 and tuple(down.shape) == (
            gate_up.shape[0], gate_up.shape[2] // 2, gate_up.shape[1])
        two_i, hidden = (gate_up.shape[2], gate_up.shape[1]) if gate_up.dim() == 3 else (0, 0)
    else:
        names = "[E, 2I, H] and [E, H, I]"
        ok = gate_up.dim() == 3 and down.dim() == 3 and tuple(down.shape) == (
            gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2)
        two_i, hidden = (gate_up.shape[1], gate_up.shape[2]) if gate_up.dim() == 3 else (0, 0)
    if not ok or two_i % 2:
        return f"{layout.gate_up} {tuple(gate_up.shape)} and {layout.down} {tuple(down.shape)} are not {names}"
    n_experts = gate_up.shape[0]
    for name, shape in ((layout.gate_up_bias, (n_experts, two_i)), (layout.down_bias, (n_experts, hidden))):
        if name and tuple(getattr(module, name).shape) != shape:
            return f"{name} {tuple(getattr(module, name).shape)} is not {list(shape)}"
    if len({t.dtype for t in tensors}) != 1 or not gate_up.dtype.is_floating_point:
        dtypes = sorted({str(t.dtype) for t in tensors})
        return f"weights and biases of dtypes {dtypes}; the kernels take one floating dtype"
    named = {layout.gate_up, layout.down, layout.gate_up_bias, layout.down_bias}
    extra = sorted(n for n, _ in module.named_parameters(recurse=True) if n not in named)
    if extra:
        return (f"parameters {extra} are not named in the [moe_experts] section; the grouped forward would leave "
                "them out")
    return None


def _activation_problem(module: nn.Module, layout: ExpertsLayout) -> str | None:
    if layout.activation == "silu":
        if detect_activation(getattr(module, layout.act)) != "silu":
            return f"{layout.act} is not silu; the section says activation silu"
        return None
    values = {n: getattr(module, n) for n in (layout.alpha, layout.limit)}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()):
        return f"clamped SwiGLU constants {values} are not finite numbers"
    if values[layout.limit] < 0:
        return f"clamped SwiGLU limit {values[layout.limit]} is negative"
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


# moe="auto" patches experts whose intermediate size is at most this. Measured (bench/cases/moe_experts.py,
# H100, 2026-12-07, fwd+bwd, 8K tokens): Qwen3-30B-A3B layer (I 768) fastkern 8.7 ms vs transformers'
# grouped_mm 10.1 ms and eager 258 ms; gpt-oss-20b layer (I 2880) 71 ms vs eager 102 ms (grouped_mm outside
# the bench's tolerance there); Mixtral-8x7B layer (I 14336) 59.9 ms vs grouped_mm 36.7 ms: few wide experts
# are cuBLAS-class GEMMs that grouped_mm runs faster than the Triton kernels.
MOE_AUTO_MAX_INTERMEDIATE = 4096


def _intermediate(module: nn.Module, layout: ExpertsLayout) -> int:
    gate_up = getattr(module, layout.gate_up)
    return (gate_up.shape[2] if layout.transposed else gate_up.shape[1]) // 2


class MoEExpertsPatcher:
    def apply(self, ctx: PatchContext, value) -> None:
        classes = ctx.section_classes("moe_experts", _REQUIRED_KEYS, "MoE experts", check=_section_problem)
        if not classes:
            return
        layouts = {cls: _layout(section, cls) for cls, section in classes.items()}
        peft_targeted = _peft_targeted(ctx.model)
        probed: dict[tuple[type, torch.dtype], ProbeVerdict] = {}
        for name, module in ctx.named_modules():
            cls = type(module)
            if parametrize.is_parametrized(module):  # torch swaps in a subclass named Parametrized<cls>
                cls = cls.__bases__[0]
            layout = layouts.get(cls)
            if layout is None:
                continue
            absent = [n for n in layout.attributes() if not hasattr(module, n)]
            if absent:
                ctx.report.add_skipped(name, "moe", f"{type(module).__name__} has no attribute(s) {absent}")
                continue
            if parametrize.is_parametrized(module) and not _only_peft_lora(module):
                ctx.report.add_skipped(name, "moe", "the expert weights carry a parametrization; transformers' "
                                                    "forward runs them")
                continue
            problem = _layout_problem(module, layout) or _activation_problem(module, layout)
            if problem:
                ctx.report.add_skipped(name, "moe", problem)
                continue
            inter = _intermediate(module, layout)
            if value == "auto" and inter > MOE_AUTO_MAX_INTERMEDIATE:
                ctx.report.add_skipped(name, "moe", f"moe=\"auto\": intermediate size {inter} > "
                                       f"{MOE_AUTO_MAX_INTERMEDIATE}, where transformers' grouped_mm experts measured "
                                       "faster (moe=True patches it anyway)")
                continue
            key = (type(module), getattr(module, layout.gate_up).dtype)
            if key not in probed:
                probed[key] = _probe(module, layout)
            n_experts = getattr(module, layout.gate_up).shape[0]
            detail = (f"{type(module).__name__} -> fastkern.ops.moe_experts (grouped GEMMs over {n_experts} experts; "
                      f"{layout.describe()})")
            if id(module) in peft_targeted:
                detail += "; with PEFT's LoRA on the expert parameters (adapted weights read per call)"
            state = {"moe": layout, "moe_experts_implementation": _experts_implementation(module)}
            ctx.replace_forward_probed(module, name, grouped_moe_experts_forward, detail, state, probed[key])

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        # Instance forwards and _fastkern_* attributes are removed generically by unpatch_model.
        return None


MOE_PATCHER = MoEExpertsPatcher()
