"""Tiled-MLP patcher (option ``tiled_mlp``): decoder MLPs run over token tiles on long inputs, so their
[tokens, intermediate] tensors exist one tile at a time (fastkern/ops/tiled_mlp.py, docs/long_context.md).

Values: ``"auto"`` (default) tiles a call when one [tokens, intermediate] activation of it would exceed
``AUTO_BYTES`` (512 MiB; Llama-3.1-8B in bf16: above 18,724 tokens per call, Llama-3.2-1B: above 32,768),
so short sequences run the MLP exactly as before, at the cost of one Python-level check per call;
``True`` tiles every call; an int n >= 1 tiles calls with more than n tokens; ``False`` patches nothing.

Composition with the ``mlp`` patch (which runs first): the tiled forward calls whatever forward the
instance had when it was patched (fastkern's fused GLU forward, or the class's own), per tile. When it
wraps the fused forward it is registered under the ``mlp`` kind, because it *is* the fused MLP forward
plus tiling: the mlp patcher's idempotency check (``fastkern_forward_kind``) then still finds its own
patch on a second ``patch_model`` call. Alone, it is registered as ``tiled_mlp``. unpatch_model removes
both at once (the instance forward and every ``_fastkern_*`` attribute go).

The same classes as the ``mlp`` patch are eligible (the [mlp] section of each family's spec); each is
probed at patch time: two tiles of a short random input must reproduce the untiled forward, which
fails for an MLP whose tokens interact.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable

import torch
import torch.nn as nn

from ..ops.tiled_mlp import DEFAULT_TILE_BYTES, tiled_mlp
from .context import PatchContext, fastkern_forward_kind, instance_forward, signed_forward
from .probe import PROBE_TOL, ProbeVerdict, meta_skip, probe_generator, run_probe, tolerance
from .report import PatchReport

_KIND = "tiled_mlp"
# "auto" tiles a call when ONE [tokens, intermediate] tensor of it would exceed this. Untiled, a step
# then holds 2-3 GiB of MLP intermediates per layer in flight (gate, up, GLU output, their gradients);
# below it, the extra MLP forward that tiling recomputes is not worth the memory it saves, and the
# 4K-16K-token steps of ordinary fine-tuning of 8B models stay untouched.
AUTO_BYTES = 512 << 20
# Per-tile budget for one [rows, intermediate] tensor (fastkern.ops.tiled_mlp.tile_rows); read at patch time.
TILE_BYTES = DEFAULT_TILE_BYTES


@dataclasses.dataclass(frozen=True)
class TiledMLPConfig:
    inner: Callable | None  # the instance forward function wrapped (fastkern's fused MLP), None: the class's
    intermediate: int  # width of the MLP's [tokens, intermediate] activations
    min_tokens: int | None  # tile calls with more tokens than this; None: decide by AUTO_BYTES
    auto_bytes: int
    tile_bytes: int


def _activation_bytes(x: torch.Tensor) -> int:
    device = x.device.type
    return torch.get_autocast_dtype(device).itemsize if torch.is_autocast_enabled(device) else x.element_size()


def should_tile(cfg: TiledMLPConfig, x: torch.Tensor) -> bool:
    """Whether this call runs tiled: cheap integer arithmetic on x's shape, nothing on the device."""
    if x.dim() < 2 or torch.compiler.is_compiling():
        return False
    tokens = x.numel() // max(x.shape[-1], 1)
    if cfg.min_tokens is not None:
        return tokens > cfg.min_tokens
    return tokens * cfg.intermediate * _activation_bytes(x) > cfg.auto_bytes


def _inner_forward(module: nn.Module, cfg: TiledMLPConfig):
    return cfg.inner if cfg.inner is not None else type(module).forward


def _forward(self, args, kwargs):
    cfg = self._fastkern_tiled_mlp
    inner = _inner_forward(self, cfg)
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not should_tile(cfg, args[0]):
        return inner(self, *args, **kwargs)
    params = [p for p in self.parameters() if p.requires_grad]
    return tiled_mlp(types.MethodType(inner, self), args[0], params, intermediate=cfg.intermediate,
                     budget_bytes=cfg.tile_bytes)


@instance_forward(_KIND)
def tiled_mlp_forward(self, *args, **kwargs):
    return _forward(self, args, kwargs)


# The same forward wrapped around fastkern's fused MLP forward: registered as the "mlp" kind (see the
# module docstring), a distinct function so the two cases stay distinguishable.
@instance_forward("mlp")
def tiled_fused_mlp_forward(self, *args, **kwargs):
    return _forward(self, args, kwargs)


# Bound as signed_forward copies (the class forward's signature, same code): recognised by their code.
_OURS = (tiled_mlp_forward.__code__, tiled_fused_mlp_forward.__code__)


def _min_tokens(value) -> int | None:
    if value is True:
        return 0
    if value == "auto":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"fastkern.patch_model: tiled_mlp must be False, True, 'auto' or an int >= 1 (a token "
                     f"count), got {value!r}")


def _mlp_classes(ctx: PatchContext) -> dict[type, dict]:
    # Bad sections and classes missing from transformers are reported by the mlp patcher already.
    classes = {}
    for spec, section in ctx.section("mlp"):
        names = section.get("class")
        for cls_name in names if isinstance(names, list) else [names]:
            try:
                classes[spec.resolve(cls_name)] = section
            except (LookupError, TypeError):
                continue
    return classes


def _probe(module: nn.Module, cfg: TiledMLPConfig, hidden: int) -> ProbeVerdict:
    """Whether two tiles of a short input reproduce the untiled forward."""
    param = next(module.parameters(), None)
    if (skip := meta_skip(param)) is not None:
        return skip
    dtype = param.dtype if param.dtype in PROBE_TOL[_KIND] else torch.float32
    x = torch.randn(1, 5, hidden, generator=probe_generator(), device="cpu").to(device=param.device, dtype=dtype)
    inner = types.MethodType(_inner_forward(module, cfg), module)
    # An MLP that cannot run on a tile is not tiled.
    return run_probe(module, lambda: inner(x), lambda: tiled_mlp(inner, x, [], rows=3), tolerance(_KIND, dtype),
                     differs="tiles differ from the untiled forward (tokens interact?)",
                     failure="the MLP failed on a tile")


class TiledMLPPatcher:
    def apply(self, ctx: PatchContext, value) -> None:
        min_tokens = _min_tokens(value)
        classes = _mlp_classes(ctx)
        probed: dict[tuple, ProbeVerdict] = {}
        for name, module in ctx.named_modules():
            section = classes.get(type(module))
            if section is None:
                continue
            current = module.__dict__.get("forward")
            if getattr(getattr(current, "__func__", None), "__code__", None) in _OURS:
                ctx.report.add_skipped(name, _KIND, "already patched")
                continue
            wraps_fused = current is not None and fastkern_forward_kind(module) == "mlp"
            if current is not None and not wraps_fused:
                owner = getattr(current, "__qualname__", type(current).__name__)
                ctx.report.add_skipped(name, _KIND, f"forward already overridden on this instance by {owner}")
                continue
            down = getattr(module, section.get("down", ""), None)
            intermediate, hidden = getattr(down, "in_features", None), getattr(down, "out_features", None)
            if not isinstance(intermediate, int) or not isinstance(hidden, int):
                ctx.report.add_skipped(name, _KIND, f"no down projection with in/out_features ({section.get('down')!r})")
                continue
            cfg = TiledMLPConfig(current.__func__ if wraps_fused else None, intermediate, min_tokens, AUTO_BYTES,
                                 TILE_BYTES)
            param = next(module.parameters(), None)
            key = (type(module), param.dtype if param is not None else None, wraps_fused)
            if key not in probed:
                probed[key] = _probe(module, cfg, hidden)
            verdict = probed[key]
            if verdict.skips:
                ctx.report.add_skipped(name, _KIND, verdict.reason)
                continue
            when = ("every call" if min_tokens == 0 else f"calls above {min_tokens} tokens" if min_tokens
                    else f"calls whose [tokens, {intermediate}] activation exceeds {AUTO_BYTES >> 20} MiB (auto)")
            detail = verdict.annotate(f"{type(module).__name__} over token tiles of <= {TILE_BYTES >> 20} MiB per "
                                      f"[rows, {intermediate}] tensor, for {when}; around the "
                                      f"{'fused GLU' if wraps_fused else 'class'} forward")
            module.__dict__["_fastkern_tiled_mlp"] = cfg
            fn = tiled_fused_mlp_forward if wraps_fused else tiled_mlp_forward
            # Presenting the class forward's signature: callers (and transformers) bind by parameter name.
            module.__dict__["forward"] = types.MethodType(signed_forward(fn, type(module)), module)
            ctx.report.add_patched(name, _KIND, detail)

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        # The instance forward and _fastkern_tiled_mlp are removed generically by unpatch_model.
        return None


TILED_MLP_PATCHER = TiledMLPPatcher()
