"""Regional compilation patcher (option ``compile``): each decoder layer of the model runs through
``torch.compile``, one graph shared by all layers of the same class and shape.

Why: a LoRA fine-tuning step of a 1B model is host-bound on a fast GPU: the Python and dispatcher work
of ~20k operator calls per step takes longer than the GPU work they launch (docs/e2e.md). Compiling
the decoder layers replaces most of that host work with one compiled graph call per layer, and lets
Inductor fuse the small elementwise ops around fastkern's kernels (which it sees as opaque custom ops,
registered with fake implementations in fastkern/ops). Compiling one layer class, rather than the
whole model, keeps compile time to one graph per layer class and shape, independent of depth: layer
instances are graph inputs (torch's inlined nn modules), not baked-in constants.

How: ``nn.Module.compile()`` on each decoder layer instance (transformers' GradientCheckpointingLayer):
it compiles that instance's call only, so other models and the class are untouched, and
``unpatch_model`` clears it. Gradient checkpointing composes: transformers wraps the layer's forward
in the checkpoint function, which torch.compile traces as one region to recompute.

Values: ``False`` (default) or ``True``. The first steps of each new sequence shape pay the
compilation (tens of seconds on a GPU for a Llama layer); after the first recompile, shapes are
compiled dynamic.
"""

from __future__ import annotations

import weakref

import torch.nn as nn

from .context import PatchContext
from .report import PatchReport

_KIND = "compile"
# Layers this patcher compiled (a layer the user compiled themselves is left alone by unpatch_model).
_COMPILED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _decoder_layers(model: nn.Module):
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers without the layer base class: nothing to compile regionally
        return
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer):
            yield name, module


class CompilePatcher:
    def apply(self, ctx: PatchContext, value) -> None:
        for name, module in _decoder_layers(ctx.model):
            if getattr(module, "_compiled_call_impl", None) is not None:
                ctx.report.add_skipped(name, _KIND, "already compiled (nn.Module.compile was called on it)")
                continue
            module.compile()
            _COMPILED.add(module)
            ctx.report.add_patched(name, _KIND, f"{type(module).__name__} -> torch.compile (this instance's call)")

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        for name, module in _decoder_layers(model):
            if module in _COMPILED:
                _COMPILED.discard(module)
                module._compiled_call_impl = None
                report.add_patched(name, _KIND, "compiled call removed")


COMPILE_PATCHER = CompilePatcher()
