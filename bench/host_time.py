"""The CPU proxy of a training step's host time (``python -m bench.host_ops --time``): steps of the
models bench/host_ops.py builds, on one CPU thread with every Triton launch stubbed out (it returns at
once, so neither the interpreter nor any kernel work is timed; outputs are garbage). What is left is
the host work a GPU step would pay for. Wall clock on a shared CPU varies by several percent, so every
comparison here alternates its settings in rounds on the same machine.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.nn as nn

from bench.host_ops import _batch, _kernel_classes, build, step


def _no_launch(fn, *args, grid, warmup, **kwargs):
    return None


@contextlib.contextmanager
def _launches_stubbed():
    """Every Triton launch returns at once, on one CPU thread: what is left of a step is host work."""
    threads = torch.get_num_threads()
    saved = [(cls, cls.run) for cls in _kernel_classes()]
    torch.set_num_threads(1)
    for cls, _ in saved:
        cls.run = _no_launch
    try:
        yield
    finally:
        for cls, run in saved:
            cls.run = run
        torch.set_num_threads(threads)


def _step_times(model: nn.Module, count: int) -> list[float]:
    batch = _batch()
    times = []
    for _ in range(count):
        model.zero_grad(set_to_none=True)  # the optimizer's work, outside the timed region
        start = time.perf_counter()
        step(model, batch)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_steps(mode: str, patched: bool, layers: int = 16, steps: int = 25, warmup: int = 3) -> float:
    """Median ms of a training step with every Triton launch stubbed out, on one CPU thread (the CPU
    proxy of the host time, module docstring)."""
    # Built (and patched) before the launches are stubbed: patch_model's probes run the kernels, and a
    # stubbed kernel would fail them, so those patches would be skipped and the timing would be of a
    # partly patched model.
    model = build(mode, layers, patched)
    with _launches_stubbed():
        return statistics.median(_step_times(model, warmup + steps)[warmup:])


def time_switched(mode: str, module, settings: dict, layers: int = 16, steps: int = 25, rounds: int = 4,
                  warmup: int = 3, family: str = "llama") -> dict:
    """The CPU proxy of the host time of one patched model under each setting of module switches
    (``settings``: name -> {attribute of ``module``: value}), alternating ``rounds`` times so that a drift
    of the shared machine's speed hits all: per setting, the median over the rounds of each round's median
    step. The switches are restored afterwards."""
    model = build(mode, layers, True, family=family)
    medians = {name: [] for name in settings}
    previous = {attr: getattr(module, attr) for values in settings.values() for attr in values}
    try:
        with _launches_stubbed():
            for _ in range(rounds):
                for name, values in settings.items():
                    for attr, value in values.items():
                        setattr(module, attr, value)
                    medians[name].append(statistics.median(_step_times(model, warmup + steps)[warmup:]))
    finally:
        for attr, value in previous.items():
            setattr(module, attr, value)
    return {name: {"median_ms": statistics.median(v), "round_medians_ms": v} for name, v in medians.items()}


# Module switches --grouping and --qk-fusion time: (module, {setting name: {attribute: value}}, family).
SWITCHES = {
    # LoRA projections grouped (fastkern.patching.lora.GROUP_PROJECTIONS, the default) vs one by one
    "grouping": ("fastkern.patching.lora", {"grouped": {"GROUP_PROJECTIONS": True},
                                            "separate": {"GROUP_PROJECTIONS": False}}, "llama"),
    # Qwen3's per-head q/k norms inside the rope launch vs as their own launches (trainable norm weights
    # of full fine-tuning included)
    "qk_fusion": ("fastkern.patching.attention",
                  {"fused": {"FUSE_QK_NORM": True, "FUSE_QK_NORM_TRAINABLE": True},
                   "separate": {"FUSE_QK_NORM": False}}, "qwen3"),
}


def time_switch(name: str, mode: str, layers: int = 16, steps: int = 25, rounds: int = 4, warmup: int = 3) -> dict:
    import importlib

    module, settings, family = SWITCHES[name]
    return time_switched(mode, importlib.import_module(module), settings, layers, steps, rounds, warmup, family)


def time_adapter_casts(layers: int = 16, steps: int = 25, rounds: int = 4, warmup: int = 3) -> dict:
    """What the adapters' casts cost the host: the CPU proxy of two patched LoRA models, one with
    PEFT's fp32 adapters (as under TRL: each call casts A and B to bf16, in forward, in the checkpoint's
    rerun and back in backward) and one with the same adapters stored in bf16 (no casts), in
    alternating rounds. The gap bounds what moving the casts out of the step could save."""
    models = {"fp32 adapters": build("lora", layers, True), "bf16 adapters": build("lora", layers, True)}
    for name, p in models["bf16 adapters"].named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)
    medians = {name: [] for name in models}
    with _launches_stubbed():
        for _ in range(rounds):
            for name, model in models.items():
                medians[name].append(statistics.median(_step_times(model, warmup + steps)[warmup:]))
    return {name: {"median_ms": statistics.median(v), "round_medians_ms": v} for name, v in medians.items()}
