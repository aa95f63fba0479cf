"""Host work per decoder layer of one training step, counted on the CPU: unpatched vs ``patch_model`` defaults.

    TRITON_INTERPRET=1 python3 -m bench.host_ops [--out DIR] [--modes lora,full,qlora] [--top 25]

A LoRA / QLoRA step of a small model on a GPU is host-bound: the host issues the work slower than
the GPU runs it, so what it costs is the number of operations the host issues. Those can be counted
without a GPU. For one training step (forward + loss + backward, gradient checkpointing on and
non-reentrant as TRL sets it, ``use_cache=False``, bf16 weights under bf16 autocast as TRL's
``bf16=True`` runs them) of a tiny Llama-shaped model, this counts:

* ``aten``: aten operator calls, seen by a TorchDispatchMode (below autograd: the calls that reach
  a device kernel or an allocation, as on the GPU; composite ops such as ``linear`` appear as what
  they decompose into, e.g. ``t`` + ``mm``);
* ``launches``: Triton kernel launches (calls into the kernels' ``run``);
* ``py``: Python function calls, and ``c``: calls from Python into C functions (tensor methods,
  torch functions, builtins), both from ``sys.setprofile``.

Each Triton launch counts once as a launch and nothing else: the interpreter's own work inside a
launch (it copies the arguments and runs the kernel in numpy) is excluded from all other counts,
since on the GPU the launch is one driver call. Counted per decoder layer as the difference between
a model with ``--layers`` L2 and L1 decoder layers, divided by L2 - L1 (what does not scale with
depth, embeddings, loss and the step's bookkeeping, is the "step" column).

Runs with TRITON_INTERPRET=1 so fastkern's ops take their kernel branch (fastkern.ops._common.op_path
says "interpreter" for CPU tensors, "triton" for CUDA ones; the two branches issue the same host
operations, see docs/e2e.md "Host work per decoder layer" for the few differences). Modes: ``lora``
(PEFT LoRA r16 on every linear layer of the decoder, adapters fp32 as PEFT creates them under TRL),
``full`` (full fine-tuning) and ``qlora`` (bitsandbytes NF4 double-quant bases, bf16 adapters as TRL
sets them; skipped if bitsandbytes is not installed).

Writes host_ops.json and host_ops.md to --out (default: print the table only). These are CPU-side
counts, not GPU timings.

``--time LAYERS,STEPS`` (e.g. 16,25) also prints a CPU proxy of the host time: the median wall-clock
ms of a training step of a LAYERS-deep model of the same shape, per mode and variant, on one CPU
thread with every Triton launch stubbed out (it returns at once, so neither the interpreter nor any
kernel work is timed; outputs are garbage). Wall clock on a shared CPU varies by several percent: to
compare two revisions, run both in alternation (``PYTHONPATH=<checkout>``). ``--grouping`` adds, for
the LoRA and QLoRA modes, the same proxy for one patched model with its q/k/v and gate/up projections
grouped (the default) and called one by one, in alternating rounds; ``--qk-fusion`` the same for a
Qwen3-shaped model with its per-head q/k norms inside the rope launch and as their own; ``--casts`` times patched LoRA
steps with PEFT's fp32 adapters against the same adapters stored in bf16 (what the per-call casts cost).
The timing lives in bench/host_time.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys

import torch
import torch.nn as nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ["lora", "full", "qlora"]
VARIANTS = ["unpatched", "fastkern"]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             max_position_embeddings=64)
BATCH, LENGTH = 2, 16
METRICS = ("aten", "launches", "py", "c")
# Also recorded (JSON only): each aten op with the innermost Python function outside torch that issued it.
_SITES = "aten_site"


def _kernel_classes() -> list[type]:
    """The Triton classes whose ``run`` a launch goes through (the interpreter's, or the JIT's on a GPU)."""
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


def _kernel_name(fn) -> str:
    return getattr(getattr(fn, "fn", None), "__name__", type(fn).__name__)


class Counter:
    """Counts of one phase: aten ops by name, launches by kernel, Python and C calls by function."""

    def __init__(self):
        self.by_metric = {m: collections.Counter() for m in (*METRICS, _SITES)}

    def totals(self) -> dict[str, int]:
        return {m: sum(c.values()) for m, c in self.by_metric.items()}


class _AtenCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sink = self.sink()
        sink["aten"][str(func)] += 1
        sink[_SITES][f"{func} @ {_issuer()}"] += 1
        return func(*args, **(kwargs or {}))


class Recorder:
    """Installs the counters for one pass; ``phase`` names where counts go ("forward" / "backward")."""

    def __init__(self, what: str):
        self.what = what  # "aten" (aten ops + launches) or "python" (Python and C calls + launches)
        self.phases = {"forward": Counter(), "backward": Counter()}
        self.phase = "forward"
        self._patched = []

    def sink(self):
        return self.phases[self.phase].by_metric

    # -- launches: counted once, and whatever the launch does inside is hidden from the other counters
    def _wrap_run(self, cls):
        original = cls.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            if warmup:
                return original(fn, *args, grid=grid, warmup=warmup, **kwargs)
            profiler = sys.getprofile()
            sys.setprofile(None)  # before counting: the counting's own calls are not the step's
            try:
                recorder.sink()["launches"][_kernel_name(fn)] += 1
                with torch.utils._python_dispatch._disable_current_modes():
                    return original(fn, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                sys.setprofile(profiler)

        self._wrapper_code = run.__code__
        cls.run = run
        self._patched.append((cls, original))

    def _profile(self, frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code is self._wrapper_code:
                return
            self.sink()["py"][f"{_short(code.co_filename)}:{code.co_name}"] += 1
        elif event == "c_call":
            if arg is sys.setprofile or arg is sys.getprofile:
                return
            self.sink()["c"][_c_name(arg)] += 1

    @contextlib.contextmanager
    def active(self):
        for cls in _kernel_classes():
            self._wrap_run(cls)
        try:
            if self.what == "aten":
                with _AtenCounter(self.sink):
                    yield self
            else:
                sys.setprofile(self._profile)
                try:
                    yield self
                finally:
                    sys.setprofile(None)
        finally:
            for cls, original in reversed(self._patched):
                cls.run = original
            self._patched.clear()


def _issuer() -> str:
    """file:function of the innermost Python frame outside torch (the code that asked for the op)."""
    frame = sys._getframe(2)
    while frame is not None and (os.sep + "torch" + os.sep) in frame.f_code.co_filename:
        frame = frame.f_back
    return "C++ autograd" if frame is None else f"{_short(frame.f_code.co_filename)}:{frame.f_code.co_name}"


def _short(filename: str) -> str:
    for marker in ("site-packages" + os.sep, "fastkern" + os.sep):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return tail if marker.startswith("site") else "fastkern/" + tail
    return os.path.basename(filename)


def _c_name(fn) -> str:
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
    if isinstance(owner, torch.Tensor):
        return f"Tensor.{getattr(fn, '__name__', name)}"
    return name


# --------------------------------------------------------------------------------------------------
# The model and the step.


def _quantize_linears(model: nn.Module, dtype) -> None:
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in TARGETS and type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
                setattr(module, name, q.to("cpu"))


def build(mode: str, layers: int, patched: bool, dtype=torch.bfloat16, family: str = "llama") -> nn.Module:
    """The tiny model of SHAPE: Llama, or Qwen3 (``family="qwen3"``: the same shape with per-head q/k norms)."""
    import transformers

    torch.manual_seed(0)
    if family == "qwen3":
        config = transformers.Qwen3Config(num_hidden_layers=layers, use_cache=False, **SHAPE,
                                          head_dim=SHAPE["hidden_size"] // SHAPE["num_attention_heads"])
        model_class = transformers.Qwen3ForCausalLM
    else:
        config = transformers.LlamaConfig(num_hidden_layers=layers, use_cache=False, **SHAPE)
        model_class = transformers.LlamaForCausalLM
    config._attn_implementation = "sdpa"
    model = model_class(config).to(dtype)
    if mode == "qlora":
        _quantize_linears(model, dtype)
    if mode in ("lora", "qlora"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                           lora_dropout=0.0))
        if mode == "qlora":  # TRL casts the adapters of a quantized model to bf16
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
    # What TRL's trainer does: non-reentrant checkpointing, input grads for PEFT models, training mode.
    model.train()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable = getattr(inner, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.23; its default is non-reentrant
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode != "full":
        model.enable_input_require_grads()
    if patched:
        import fastkern

        fastkern.patch_model(model)
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SHAPE["vocab_size"], (BATCH, LENGTH), generator=gen)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())


def step(model: nn.Module, batch: dict, recorder: Recorder | None = None) -> float:
    # Gradients are cleared by the caller, outside the counted region (the optimizer's work, not the layers').
    if recorder is not None:
        recorder.phase = "forward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, use_cache=False).loss
    if recorder is not None:
        recorder.phase = "backward"
    loss.backward()
    return float(loss.detach())


def count(mode: str, layers: int, patched: bool) -> dict:
    """{phase: Counter} of one measured step (after a warm-up step), both passes merged."""
    model = build(mode, layers, patched)
    batch = _batch()
    step(model, batch)  # warm-up: caches, lazy imports, first-call paths
    merged = {"forward": Counter(), "backward": Counter()}
    for what in ("aten", "python"):
        model.zero_grad(set_to_none=True)
        recorder = Recorder(what)
        with recorder.active():
            step(model, batch, recorder)
        keep = ("aten", "launches", _SITES) if what == "aten" else ("py", "c")
        for phase, counter in recorder.phases.items():
            for metric in keep:
                merged[phase].by_metric[metric] = counter.by_metric[metric]
    return merged


def per_layer(small: dict, large: dict, span: int) -> dict:
    """{phase: {metric: per-layer count}} and the step constant, from two depths."""
    out = {}
    for phase in ("forward", "backward"):
        a, b = small[phase].totals(), large[phase].totals()
        out[phase] = {m: (b[m] - a[m]) / span for m in METRICS}
    out["total"] = {m: out["forward"][m] + out["backward"][m] for m in METRICS}
    return out


def top_per_layer(small: dict, large: dict, span: int, metric: str, n: int) -> list[tuple[str, float]]:
    """The n names contributing most per layer to ``metric`` (forward + backward)."""
    a, b = collections.Counter(), collections.Counter()
    for phase in ("forward", "backward"):
        a.update(small[phase].by_metric[metric])
        b.update(large[phase].by_metric[metric])
    diff = {k: (b[k] - a.get(k, 0)) / span for k in b}
    return sorted(((k, v) for k, v in diff.items() if v), key=lambda kv: -kv[1])[:n]


def measure(modes, layers=(1, 3), top=25) -> dict:
    from fastkern import runtime

    path = runtime.path_for(torch.empty(0))
    if path != "interpreter":
        raise SystemExit(f"bench/host_ops.py: fastkern's ops take the {path!r} path for CPU tensors; run with "
                         "TRITON_INTERPRET=1 so they take the kernel branch, as on the GPU")
    l1, l2 = layers
    rows = []
    for mode in modes:
        if mode == "qlora":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                rows.append(dict(mode=mode, skipped="bitsandbytes not installed"))
                continue
        for variant in VARIANTS:
            small = count(mode, l1, variant == "fastkern")
            large = count(mode, l2, variant == "fastkern")
            layer = per_layer(small, large, l2 - l1)
            step_totals = {m: sum(small[p].totals()[m] for p in ("forward", "backward")) - l1 * layer["total"][m]
                           for m in METRICS}
            rows.append(dict(
                mode=mode, variant=variant, per_layer=layer, step=step_totals,
                top={m: top_per_layer(small, large, l2 - l1, m, top) for m in (*METRICS, _SITES)},
            ))
    import peft
    import transformers

    return dict(
        what="CPU-side counts of host work per decoder layer (not GPU timings)",
        torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__, path=path,
        shape=dict(SHAPE, batch=BATCH, length=LENGTH, layers=list(layers)), rows=rows,
    )


def table(result: dict) -> str:
    lines = ["| mode | variant | aten ops / layer (fwd + bwd) | Triton launches / layer | Python calls / layer | "
             "C calls / layer | aten ops / step outside layers |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['mode']} | skipped: {row['skipped']} | | | | | |")
            continue
        p = row["per_layer"]

        def cell(m):
            return f"{p['total'][m]:.0f} ({p['forward'][m]:.0f} + {p['backward'][m]:.0f})"

        lines.append(f"| {row['mode']} | {row['variant']} | {cell('aten')} | {cell('launches')} | {cell('py')} | "
                     f"{cell('c')} | {row['step']['aten']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="directory for host_ops.json and host_ops.md")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--layers", default="1,3", help="two depths; per layer = difference / (L2 - L1)")
    parser.add_argument("--top", type=int, default=400, help="largest per-layer contributors listed in the JSON")
    parser.add_argument("--time", default=None, metavar="LAYERS,STEPS",
                        help="also time steps of a LAYERS-deep model, launches stubbed (CPU proxy, e.g. 16,25)")
    parser.add_argument("--grouping", action="store_true",
                        help="with --time: also time LoRA/QLoRA steps with the projections grouped vs one by one")
    parser.add_argument("--qk-fusion", action="store_true",
                        help="with --time: also time Qwen3-shaped steps with q/k norms fused into rope vs separate")
    parser.add_argument("--casts", action="store_true",
                        help="with --time: also time LoRA steps with fp32 adapters (cast per call) vs bf16 adapters")
    args = parser.parse_args(argv)
    if (args.grouping or args.casts or args.qk_fusion) and not args.time:
        parser.error("--grouping, --qk-fusion and --casts need --time LAYERS,STEPS")
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {MODES}")
    layers = tuple(int(v) for v in args.layers.split(","))
    if len(layers) != 2 or not 0 < layers[0] < layers[1]:
        parser.error("--layers takes two increasing depths, e.g. 1,3")
    timing = None
    if args.time:
        timing = tuple(int(v) for v in args.time.split(","))
        if len(timing) != 2 or min(timing) < 1:
            parser.error("--time takes a depth and a step count, e.g. 16,25")
    from bench.host_time import time_adapter_casts, time_steps, time_switch

    result = measure(modes, layers, args.top)
    text = table(result)
    if timing:
        result["time_ms"] = {}
        lines = [f"CPU proxy of host time: median ms per step, {timing[0]} layers, {timing[1]} steps, one thread, "
                 "Triton launches stubbed"]
        for row in result["rows"]:
            if "skipped" not in row:
                ms = time_steps(row["mode"], row["variant"] == "fastkern", *timing)
                result["time_ms"][f"{row['mode']} {row['variant']}"] = ms
                lines.append(f"- {row['mode']} {row['variant']}: {ms:.1f} ms")
        text += "\n\n" + "\n".join(lines)
    for name, flag, title, switch_modes in (
            ("grouping", args.grouping, "Projections grouped vs one by one", ("lora", "qlora")),
            ("qk_fusion", args.qk_fusion, "Qwen3 shape, q/k norms fused into rope vs separate", MODES)):
        if not flag:
            continue
        result[f"{name}_ms"] = {}
        lines = [f"{title} (patched, same model, alternating rounds; median of round medians):"]
        for mode in (m for m in modes if m in switch_modes):
            if any(r["mode"] == mode and "skipped" in r for r in result["rows"]):
                continue
            timed = result[f"{name}_ms"][mode] = time_switch(name, mode, *timing)
            lines.append(f"- {mode}: " + ", ".join(f"{k} {t['median_ms']:.1f} ms" for k, t in timed.items()))
        text += "\n\n" + "\n".join(lines)
    if args.casts and "lora" in modes:
        timed = result["adapter_casts_ms"] = time_adapter_casts(*timing)
        text += ("\n\nLoRA adapters stored in fp32 (cast per call) vs bf16 (patched, alternating rounds): "
                 + ", ".join(f"{name} {t['median_ms']:.1f} ms" for name, t in timed.items()))
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_ops.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "host_ops.md"), "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
