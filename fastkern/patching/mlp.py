"""MLP patcher: down(act(gate(x)) * up(x)) -> down(fused_glu(gate(x), up(x))).

Validation, per MLP class found in the model:
  1. the spec's class resolves in the installed transformers (else a spec problem);
  2. the instance has the gate/up/down/act attributes the spec names;
  3. act_fn is probed on a grid of points and must equal silu, gelu(tanh) or gelu(erf) (the kernel
     is chosen from what it computes, so a config with another hidden_act is handled or skipped);
  4. (fused ``gate_up`` only) the projection's output width is even;
  5. the patched forward is compared with the original on a small random input; a mismatch
     (transformers changed the MLP) skips the class with the measured error in the report.

``output_dropout`` names the module attribute holding the dropout probability a family applies to the
MLP's output (Seed-OSS: ``residual_dropout``); the patched forward applies it as the class does,
``dropout(down(...), p, training)``, drawing its mask from the same RNG at the same point of the forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.glu import geglu, swiglu
from ..reference.glu import activation_reference
from . import rerun_tail
from .context import PatchContext, instance_forward, output_dropout_problem
from .lora import call_projections
from .probe import ProbeVerdict, meta_skip, not_probed, probe_generator, run_probe, tolerance
from .report import PatchReport

_REQUIRED_KEYS = ("class", "down", "act", "activation")
# Either two projections (gate = "gate_proj", up = "up_proj") or one fused projection whose output is
# [gate | up] along the last dim (gate_up = "gate_up_proj": Phi-3, GLM), never both.


def _check_projections(section) -> str | None:
    separate = "gate" in section or "up" in section
    if "gate_up" in section:
        return "give either gate_up or gate and up, not both" if separate else None
    if not ("gate" in section and "up" in section):
        return "needs gate and up, or gate_up"
    return None


def _projection_names(section) -> tuple[str, str | None, str]:
    """(gate or fused gate_up, up or None when fused, down)."""
    if "gate_up" in section:
        return section["gate_up"], None, section["down"]
    return section["gate"], section["up"], section["down"]
_KERNEL_NAMES = {"silu": "swiglu", "gelu_tanh": "geglu(tanh)", "gelu": "geglu(erf)"}


def _fused(activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    # gate and up are private intermediates of the MLP forward, so backward may reuse their storage.
    if activation == "silu":
        return swiglu(gate, up, overwrite_inputs_in_backward=True)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return geglu(gate, up, approximate, overwrite_inputs_in_backward=True)


def _glu_mlp(module: nn.Module, config: tuple, x: torch.Tensor) -> torch.Tensor:
    """config: (gate or fused gate_up, up or None, down, activation, output dropout attribute or None)."""
    gate_name, up_name, down_name, activation, dropout_name = config
    if up_name is None:
        # One fused projection: the first half of its output is the gate, the second the up projection
        # (what the family's chunk(2, dim=-1) takes); the halves are strided views the kernel reads as such.
        gate, up = getattr(module, gate_name)(x).chunk(2, dim=-1)
    else:
        gate, up = call_projections((getattr(module, gate_name), getattr(module, up_name)), x)
    h = _fused(activation, gate, up)
    if dropout_name is not None and module.training and getattr(module, dropout_name):
        # A dropout after the down projection: its mask reads the product's values, so no rerun skip
        # (rerun_tail sees the dropout's node between the MLP output and the residual add anyway).
        return F.dropout(getattr(module, down_name)(h), p=getattr(module, dropout_name), training=True)
    if rerun_tail.state.mode is None:
        return getattr(module, down_name)(h)
    # Inside a checkpoint's rerun the last call may skip its product (patching/rerun_tail.py).
    return rerun_tail.last_projection(module, getattr(module, down_name), h)


@instance_forward("mlp")
def fused_glu_mlp_forward(self, x):
    return _glu_mlp(self, self._fastkern_mlp, x)


def detect_activation(act_fn) -> str | None:
    """Which of silu / gelu_tanh / gelu ``act_fn`` computes, judged on a grid in fp64."""
    # On the CPU whatever the default device: inside `with torch.device("meta")` a meta grid has no values.
    grid = torch.linspace(-8.0, 8.0, 257, dtype=torch.float64, device="cpu")
    try:
        with torch.no_grad():
            got = act_fn(grid)
    except Exception:
        return None
    for name in ("silu", "gelu_tanh", "gelu"):
        if torch.allclose(got, activation_reference(grid, name), rtol=1e-9, atol=1e-12):
            return name
    return None


def _probe(module: nn.Module, config: tuple, in_features: int) -> ProbeVerdict:
    """Whether the patched forward matches the class forward on a random input."""
    param = next(module.parameters(), None)
    if (skip := meta_skip(param)) is not None:
        return skip
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    x = torch.randn(3, in_features, generator=probe_generator(), device="cpu").to(device=param.device, dtype=dtype)
    return run_probe(module, lambda: type(module).forward(module, x), lambda: _glu_mlp(module, config, x),
                     tolerance("mlp", dtype))


class MLPPatcher:
    def apply(self, ctx: PatchContext, value) -> None:
        classes = ctx.section_classes("mlp", _REQUIRED_KEYS, "MLP", check=_check_projections)
        probed: dict[tuple[type, torch.dtype], ProbeVerdict] = {}
        for name, module in ctx.named_modules():
            section = classes.get(type(module))
            if section is None:
                continue
            names = _projection_names(section)
            dropout_name = section.get("output_dropout")
            absent = [n for n in (*names, section["act"], dropout_name) if n is not None and not hasattr(module, n)]
            if absent:
                ctx.report.add_skipped(name, "mlp", f"{type(module).__name__} has no attribute(s) {absent}")
                continue
            if (why := output_dropout_problem(module, dropout_name)) is not None:
                ctx.report.add_skipped(name, "mlp", why)
                continue
            fused_width = getattr(getattr(module, names[0]), "out_features", 0) if names[1] is None else 0
            if fused_width % 2:
                ctx.report.add_skipped(name, "mlp", f"{names[0]} has an odd output width {fused_width}; "
                                                    "it cannot split into gate and up halves")
                continue
            activation = detect_activation(getattr(module, section["act"]))
            if activation is None:
                ctx.report.add_skipped(
                    name, "mlp", f"{section['act']} is not silu, gelu(tanh) or gelu(erf); no fused kernel for it"
                )
                continue
            config = (*names, activation, dropout_name)
            in_features = getattr(getattr(module, names[0]), "in_features", None)
            param = next(module.parameters(), None)
            key = (type(module), param.dtype if param is not None else None)
            if key not in probed:
                probed[key] = (_probe(module, config, in_features) if in_features
                               else not_probed("gate has no in_features"))
            detail = f"{type(module).__name__} -> {_KERNEL_NAMES[activation]}"
            detail += f" (fused {names[0]} split in halves)" if names[1] is None else ""
            detail += f", then dropout({dropout_name}) as the class applies it" if dropout_name else ""
            ctx.replace_forward_probed(module, name, fused_glu_mlp_forward, detail, {"mlp": config}, probed[key])

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        # Instance forwards and _fastkern_* attributes are removed generically by unpatch_model.
        return None


MLP_PATCHER = MLPPatcher()
