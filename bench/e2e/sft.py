"""End-to-end: an unmodified TRL 1.16 SFT script, per variant, side by side on one GPU.

    python -m bench.e2e.sft --out DIR [--modes lora,full,qlora,packed] [--variants trl,trl+liger,fastkern,...]
        [--steps 12] [--size 1b] [--length 4096] [--batch 2] [--reference-steps 30]
    python -m bench.e2e.sft --tiny --out DIR      # CPU: tiny model, a few steps (the tests run this)

Variants (each runs in a fresh process: Liger patches transformers' classes globally, and a fresh
process gives each variant its own peak memory):
  trl                  TRL default (its fused LM head, no other kernels)
  trl+liger            SFTConfig(use_liger_kernel=True): Liger's layer kernels under TRL's fused head
  fastkern             ``fastkern.patch_model(model)`` with no options, before the trainer is built
  fastkern-after-init  the same line on ``trainer.model`` after ``SFTTrainer(...)`` is built
  fastkern-compile     ``patch_model(model, compile=True)``: the defaults plus regional compilation
  fastkern+compile     the defaults plus ``SFTConfig(torch_compile=True)`` (TRL/Trainer compile the model)
  fastkern-offload     the defaults plus ``checkpointing="offload"``
  fastkern-torch-checkpoint  the defaults with ``checkpointing=False``: the checkpoint function TRL asks for
                       (torch's non-reentrant) instead of fastkern's "recompute"
  fastkern-separate-projections  the defaults, but q/k/v and gate/up LoRA projections run as separate
                       calls instead of one group each (attribution of that grouping; lora/qlora modes)
  fastkern-cudnn-attention  the defaults with cuDNN put first among SDPA's backends for the patched
                       attention calls (fastkern/patching/sdpa_backend.py, PREFER_CUDNN); fastkern-flash-attention
                       the defaults with torch's own order (FlashAttention first)
  fastkern-separate-qk-norm  the defaults, but trainable per-head q/k norms (Qwen3, ``--family qwen3``) run as
                       their own modules instead of inside the rope launch (FUSE_QK_NORM_TRAINABLE off)
  fastkern-keep-last-2, fastkern-keep-last-4  the defaults, with the last 2 / 4 decoder layers not
                       checkpointed (attribution: the recompute they skip, the peak they add)
  fastkern-dequantize-again  the defaults, but NF4 projections dequantize their weight again in backward
                       instead of reusing the checkpoint rerun's (attribution of that reuse; qlora mode)
  reference            unpatched, fp32 weights, TF32 off: the high-precision run the loss rule uses
Modes: lora (r16 on all linear layers), full (full fine-tuning), qlora (NF4 double-quant base as
transformers' BitsAndBytesConfig loads it, LoRA r16), packed (lora with SFTConfig(packing=True) over
documents of mixed length).

Model: Llama-3.2-1B shape, random init, bf16, gradient checkpointing on (TRL's
default), batch 2 x 4096, AdamW, constant lr. Step time: median over the steps after two warm-up steps,
synchronized; memory: torch's peak allocated over the run. Loss accuracy (docs/e2e.md): each variant's
loss trajectory vs the fp32 reference run's, relative deviation, next to TRL default's.

Writes DIR/sft.json (rows of bench/schema.py: op ``sft``, case ``<mode> train step``, impl the variant,
the loss trajectory and its deviation from the reference in ``extra``), DIR/sft.md (the tables, with
ratios against TRL and TRL + Liger) and DIR/sft.png. ``--tiny``: the tiny Llama shape, vocab 256, batch
2 x 32 tokens, 3 steps, on the CPU (Triton's interpreter or the references: times mean nothing).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench.e2e import common

VARIANTS = ["trl", "trl+liger", "fastkern", "fastkern-after-init", "fastkern-compile", "fastkern+compile",
            "fastkern-offload", "fastkern-torch-checkpoint", "fastkern-dequantize-again", "fastkern-full-rerun",
            "fastkern-separate-projections", "fastkern-cudnn-attention", "fastkern-flash-attention",
            "fastkern-separate-qk-norm", "fastkern-keep-last-2", "fastkern-keep-last-4", "reference"]
# Variants that change process-wide state (Liger patches transformers' classes; TRL's torch_compile
# compiles the whole model) always get their own process; with --shared-process the others share one.
ISOLATED = {"trl+liger", "fastkern+compile", "reference"}
MODES = ["lora", "full", "qlora", "packed"]
TINY = dict(size="tiny", vocab=256, length=32, batch=2, steps=3, reference_steps=3)


def _model(args, mode, dtype, device):
    import torch

    from fastkern.demo import build_model

    if args.family == "qwen3":
        if mode == "qlora":
            raise SystemExit("--family qwen3 runs the lora, full and packed modes")
        return _qwen3_model(args.size, args.vocab, dtype).to(device)
    if mode != "qlora":
        return build_model(args.size, args.vocab, dtype).to(device)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    saved = os.path.join(args.work, f"base-{args.size}")
    if not os.path.isdir(saved):
        build_model(args.size, args.vocab, torch.bfloat16).save_pretrained(saved)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    place = torch.cuda.current_device() if device.type == "cuda" else "cpu"
    return AutoModelForCausalLM.from_pretrained(saved, quantization_config=quant, dtype=dtype, device_map={"": place})


def _qwen3_model(size: str, vocab: int, dtype):
    """A Qwen3-shaped model of the demo's size: the Llama dimensions plus Qwen3's per-head q/k RMSNorms
    (what ``fastkern-separate-qk-norm`` is measured on)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fastkern.demo_common import SIZES

    dims = SIZES[size]
    torch.manual_seed(0)
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    config = Qwen3Config(vocab_size=vocab, max_position_embeddings=8192, head_dim=head_dim, tie_word_embeddings=False,
                         **dims)
    return Qwen3ForCausalLM(config).to(dtype)


def shape_text(args) -> str:
    family = "" if args.family == "llama" else f"{args.family} "
    return f"{family}{args.size} B{args.batch} T{args.length}"


def worker(args) -> dict:
    """One variant of one mode in this process; returns its row (bench/schema.py)."""
    import torch
    from trl import SFTConfig, SFTTrainer

    import fastkern
    from fastkern.demo import build_dataset, build_tokenizer, step_timer

    mode, variant = args.mode, args.variant
    device = common.device(args.tiny)
    reference = variant == "reference"
    if reference:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float32 if reference or device.type == "cpu" else torch.bfloat16
    steps = args.reference_steps if reference or args.accuracy else args.steps
    model = _model(args, mode, dtype, device)
    if mode in ("lora", "qlora", "packed"):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    report = None
    # "fastkern-separate-qk-norm": trainable per-head q/k norms run as their own modules instead of inside
    # the rope launch (fastkern/patching/attention.py, FUSE_QK_NORM_TRAINABLE, read per call); restored
    # after the variant like the attribution switches below.
    attention_patching = importlib.import_module("fastkern.patching.attention")
    attention_patching.FUSE_QK_NORM_TRAINABLE = variant != "fastkern-separate-qk-norm"
    patch_options = {"fastkern-offload": {"checkpointing": "offload"}, "fastkern-compile": {"compile": True},
                     "fastkern-torch-checkpoint": {"checkpointing": False}}.get(variant, {})
    if variant in ("fastkern", "fastkern+compile", "fastkern-offload", "fastkern-compile", "fastkern-torch-checkpoint",
                   "fastkern-dequantize-again", "fastkern-full-rerun", "fastkern-separate-projections",
                   "fastkern-cudnn-attention", "fastkern-flash-attention", "fastkern-separate-qk-norm",
                   "fastkern-keep-last-2", "fastkern-keep-last-4"):
        report = fastkern.patch_model(model, **patch_options)
    callbacks = [timer := step_timer()]
    if variant.startswith("fastkern-keep-last-"):
        callbacks.append(_keep_last_callback(int(variant.rsplit("-", 1)[1])))
    if args.profile:
        from transformers import TrainerCallback

        callbacks.append(_profiler_callback(TrainerCallback, args.out, f"{mode}-{variant}"))
    packed = mode == "packed"
    n_rows = steps * args.batch * (4 if packed else 1)
    dataset = build_dataset(n_rows, args.length, min_length=args.length // 8 if packed else None)
    out_dir = tempfile.mkdtemp(prefix="fastkern-e2e-")
    config = SFTConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=1e-4 if mode != "full" else 1e-5,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
        max_length=args.length, bf16=dtype == torch.bfloat16, gradient_checkpointing=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, packing=packed, use_liger_kernel=variant == "trl+liger",
        torch_compile=variant == "fastkern+compile", use_cpu=device.type == "cpu",
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=build_tokenizer(),
                         callbacks=callbacks)
    if variant == "fastkern-after-init":
        report = fastkern.patch_model(trainer.model)
    common.reset_peak(device)
    error = None
    # Attribution only: NF4 projections dequantize again in backward instead of reusing the checkpoint
    # rerun's 16-bit weight (fastkern/ops/lora_linear.py, REUSE_MAX_ROWS); restored after the variant.
    # (By module path: fastkern.ops.lora_linear the attribute is the function of that name.)
    # Likewise "fastkern-full-rerun": checkpoint reruns compute the MLP's down projection
    # (fastkern/patching/rerun_tail.py, SKIP_LAST_PROJECTION), and "fastkern-separate-projections": each
    # LoRA projection its own call (fastkern/patching/lora.py, GROUP_PROJECTIONS).
    lora_ops = importlib.import_module("fastkern.ops.lora_linear")
    from fastkern.patching import lora as lora_patching, rerun_tail, sdpa_backend
    reuse_rows, prefer_cudnn = lora_ops.REUSE_MAX_ROWS, sdpa_backend.PREFER_CUDNN
    try:
        if variant == "fastkern-dequantize-again":
            lora_ops.REUSE_MAX_ROWS = 0
        rerun_tail.SKIP_LAST_PROJECTION = variant != "fastkern-full-rerun"
        lora_patching.GROUP_PROJECTIONS = variant != "fastkern-separate-projections"
        if variant in ("fastkern-cudnn-attention", "fastkern-flash-attention"):
            sdpa_backend.PREFER_CUDNN = variant == "fastkern-cudnn-attention"
        trainer.train()
    except Exception as exc:  # a variant that fails is reported as such, not hidden
        error = common.error_text(exc)
    finally:
        lora_ops.REUSE_MAX_ROWS = reuse_rows
        rerun_tail.SKIP_LAST_PROJECTION = True
        lora_patching.GROUP_PROJECTIONS = True
        sdpa_backend.PREFER_CUDNN = prefer_cudnn
        attention_patching.FUSE_QK_NORM_TRAINABLE = True
    shutil.rmtree(out_dir, ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    warm = timer.times[2:] if len(timer.times) > 4 else timer.times
    step_s = statistics.median(warm) if warm and error is None else None
    tokens = args.batch * args.length
    return common.schema.make_row(
        common.environment(device), op="sft", case=f"{mode} train step", shape=shape_text(args),
        dtype=str(dtype).removeprefix("torch."), impl=variant, ms=step_s * 1e3 if step_s else None,
        throughput=tokens / step_s if step_s else None, throughput_unit="tokens/s",
        loss=losses[-1] if losses else None, error=error, losses=losses, step_times_s=list(timer.times),
        report=str(report) if report is not None else "", **(common.peak(device) if error is None else {}))


def _decoder_layers(model) -> list:
    """The model's checkpointable decoder layers, first to last."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _keep_last_callback(k: int):
    """Attribution only: once the Trainer has turned gradient checkpointing on, the last ``k`` decoder
    layers run without it (their activations are kept from forward to backward; they are the first
    freed in backward). What skipping their recompute saves, and whether the step's peak moves."""
    from transformers import TrainerCallback

    class KeepLast(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            layers = _decoder_layers(model)
            for layer in layers[len(layers) - k:]:
                layer.gradient_checkpointing = False

    return KeepLast()


def _profiler_callback(base, out, label, first=4, steps=3):
    """Profiles optimizer steps [first, first + steps): prints the CUDA kernels by total device time and
    the device-busy time per step next to the wall time, so host-bound steps show as such."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    class ProfileSteps(base):
        def __init__(self):
            self.prof, self.t0, self.trace, self.handles = None, 0.0, [], []

        def _mark(self, what):
            self.trace.append((what, torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30))

        def _trace_memory(self, model):
            """Allocated memory at each decoder layer's forward (and checkpoint rerun) and at the start of its
            backward, for one step: where in the step the peak sits, and what the checkpoints cost."""
            layers = _decoder_layers(model)
            for i, layer in enumerate(layers):
                def hook(module, args, out, i=i):
                    # a layer's second forward in the step is its checkpoint rerun in backward
                    self._mark(f"{'rerun' if any(w == f'fwd {i}' for w, _, _ in self.trace) else 'fwd'} {i}")
                    t = out[0] if isinstance(out, tuple) else out
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(lambda g, i=i: self._mark(f"bwd {i}"))
                self.handles.append(layer.register_forward_hook(hook))

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == first - 1 and out:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.trace = []
                self._mark("step begin")
                self._trace_memory(kw["model"])
            if state.global_step == first:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.handles:
                torch.cuda.synchronize()
                self._mark("step end")
                for h in self.handles:
                    h.remove()
                self.handles = []
                peak = max(t[2] for t in self.trace)
                at_peak = next(t[0] for t in self.trace if t[2] >= peak)
                print(f"[memory {label}] step peak {peak:.2f} GiB, first reached by '{at_peak}'; allocated at "
                      + ", ".join(f"{w} {a:.2f}" for w, a, _ in self.trace if not w.startswith("rerun")))
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, f"memory-{label}.json"), "w") as f:
                    json.dump({"label": label, "trace": self.trace}, f)
            if self.prof is not None and state.global_step == first + steps:
                torch.cuda.synchronize()
                wall = (time.perf_counter() - self.t0) / steps
                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                # Kernel rows only (device_type CUDA): operator rows repeat their kernels' device time.
                device = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / steps / 1e3
                print(f"[profile {label}] wall {wall * 1e3:.1f} ms/step, device busy {device:.1f} ms/step, "
                      f"CPU ops {sum(e.count for e in events if e.device_type.name == 'CPU') / steps:.0f}/step")
                print(events.table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=60))
                if out:  # every kernel and operator, per step, to diff two variants row by row
                    rows = [{"name": e.key, "kind": e.device_type.name, "count": e.count / steps,
                             "self_device_ms": e.self_device_time_total / steps / 1e3,
                             "device_ms": e.device_time_total / steps / 1e3,
                             "self_cpu_ms": e.self_cpu_time_total / steps / 1e3} for e in events]
                    os.makedirs(out, exist_ok=True)
                    with open(os.path.join(out, f"profile-{label}.json"), "w") as f:
                        json.dump({"label": label, "wall_ms": wall * 1e3, "device_busy_ms": device, "rows": rows}, f)
                self.prof = None

    return ProfileSteps()


def _deviation(losses, reference):
    n = min(len(losses), len(reference))
    if n == 0:
        return float("nan")
    num = sum((a - b) ** 2 for a, b in zip(losses[:n], reference[:n])) ** 0.5
    den = sum(b * b for b in reference[:n]) ** 0.5
    return num / den


def add_deviations(rows: list[dict]) -> None:
    """extra.loss_deviation of every row of a mode that has a reference run: its loss trajectory's relative
    deviation from the fp32 reference's (docs/e2e.md's accuracy rule)."""
    for r in rows:
        ref = next((x for x in rows if x["case"] == r["case"] and x["impl"] == "reference"), None)
        if ref is not None and r is not ref and r["extra"].get("losses") and ref["extra"].get("losses"):
            dev = _deviation(r["extra"]["losses"], ref["extra"]["losses"])
            if dev == dev:
                r["extra"]["loss_deviation"] = dev


def tables(rows: list[dict]) -> str:
    lines = []
    for case in dict.fromkeys(r["case"] for r in rows):
        by_impl = {r["impl"]: r for r in rows if r["case"] == case}
        base, liger = by_impl.get("trl"), by_impl.get("trl+liger")
        lines += [f"### {case}", "",
                  "| variant | step | tokens/s | vs TRL | vs TRL+Liger | peak | loss dev. vs fp32 ref. | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for impl, r in by_impl.items():
            tps = r["throughput"]
            vs = lambda other: (f"{tps / other['throughput']:.2f}x"  # noqa: E731
                                if tps and other and other["throughput"] else "")
            dev = r["extra"].get("loss_deviation")
            step = "-" if r["ms"] is None else f"{r['ms']:.1f} ms"
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib'] / 1024:.2f} GiB ({r['peak_scope']})"
            lines.append(f"| {impl} | {step} | {'-' if tps is None else f'{tps:,.0f}'} | {vs(base)} | {vs(liger)} | "
                         f"{peak} | {'' if dev is None else f'{dev:.2e}'} | {r['error'] or ''} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = [v for v in VARIANTS if v != "reference" and any(r["impl"] == v for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        ys = []
        for case in cases:
            base = next((r for r in rows if r["case"] == case and r["impl"] == "trl"), None)
            r = next((r for r in rows if r["case"] == case and r["impl"] == variant), None)
            ok = r and base and r["throughput"] and base["throughput"]
            ys.append(r["throughput"] / base["throughput"] if ok else 0)
        ax.bar([m + i * width for m in range(len(cases))], ys, width, label=variant)
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(cases))], cases)
    ax.set_ylabel("tokens/s vs TRL default")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--modes", default="lora,full,qlora")
    parser.add_argument("--variants", default="trl,trl+liger,fastkern,fastkern-after-init")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--reference-steps", type=int, default=30)
    parser.add_argument("--accuracy", action="store_true", help="every variant runs --reference-steps steps")
    parser.add_argument("--size", default="1b")
    parser.add_argument("--family", default="llama", choices=["llama", "qwen3"],
                        help="llama (Llama-3.2-1B shape at --size 1b) or qwen3 (the same dimensions with per-head "
                             "q/k norms)")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="CPU: tiny model, vocab 256, 2 x 32 tokens, 3 steps")
    parser.add_argument("--shared-process", action="store_true",
                        help="run the variants that leave no process-wide state in one process (less start-up time)")
    parser.add_argument("--profile", action="store_true", help="print a per-kernel profile of 3 steps per variant")
    parser.add_argument("--work", default=None, help="scratch folder (the saved QLoRA base)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny and not args.variant:
        vars(args).update(TINY)
    for name in ("out", "work"):  # the workers run from the repository root
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    modes, variants = args.modes.split(","), args.variants.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; known: {MODES}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {VARIANTS}")
    return args


def worker_command(args, mode: str, group: list[str], result: str) -> list[str]:
    cmd = [sys.executable, "-m", "bench.e2e.sft", "--mode", mode, "--variant", ",".join(group), "--result", result,
           "--work", args.work, "--steps", str(args.steps), "--reference-steps", str(args.reference_steps),
           "--size", args.size, "--family", args.family, "--vocab", str(args.vocab), "--length", str(args.length),
           "--batch", str(args.batch)]
    cmd += ["--accuracy"] if args.accuracy else []
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--profile", "--out", args.out] if args.profile else []
    return cmd


def run_workers(args, work: str) -> list[dict]:
    rows = []
    for mode in args.modes.split(","):
        variants = args.variants.split(",")
        shared = [v for v in variants if v not in ISOLATED] if args.shared_process else []
        groups = ([shared] if shared else []) + [[v] for v in variants if v not in shared]
        for group in groups:
            result = os.path.join(work, f"{mode}-{'-'.join(group)}.json")
            t0 = time.time()
            proc = subprocess.run(worker_command(args, mode, group, result), capture_output=True, text=True,
                                  cwd=common.ROOT)
            if args.profile:
                print("\n".join(line for line in proc.stdout.splitlines() if line.strip()), flush=True)
            if proc.returncode != 0 or not os.path.exists(result):
                env = common.environment(common.device(args.tiny))
                new = [common.schema.make_row(env, op="sft", case=f"{mode} train step", shape=shape_text(args),
                                              dtype="bfloat16", impl=v,
                                              error=f"worker exit {proc.returncode}: {proc.stderr[-300:]}")
                       for v in group]
            else:
                new = common.schema.read(result)
            rows += new
            for r in new:
                step = "-" if r["ms"] is None else f"{r['ms']:8.1f} ms"
                print(f"{mode:7s} {r['impl']:20s} {step} ({time.time() - t0:.0f} s for {','.join(group)}) "
                      f"{r['error'] or ''}", flush=True)
            common.write(args.out, "sft", rows)  # a run cut short keeps the variants done
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:  # a worker process: one or several variants, one after the other
        import gc

        import torch

        rows = []
        for variant in args.variant.split(","):
            rows.append(worker(argparse.Namespace(**{**vars(args), "variant": variant})))
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        common.schema.write(args.result, rows)
        return 0
    os.makedirs(args.out, exist_ok=True)
    scratch = args.work is None
    work = args.work = args.work or tempfile.mkdtemp(prefix="fastkern-e2e-work-")
    os.makedirs(work, exist_ok=True)
    rows = run_workers(args, work)
    add_deviations(rows)
    path = common.write(args.out, "sft", rows)
    text = tables(rows)
    print(text)
    with open(os.path.join(args.out, "sft.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(args.out, "sft.png"))
    print(f"wrote {path} ({len(rows)} rows)")
    if scratch:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
