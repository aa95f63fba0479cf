"""End-to-end: an unmodified TRL 1.16 SFT script, per variant, side by side on one GPU.

    python3 bench/e2e.py --out DIR [--modes lora,full,qlora,packed] [--variants trl,trl+liger,fastkern,...]
        [--steps 12] [--size 1b] [--length 4096] [--batch 2] [--reference-steps 30]

Variants (each runs in a fresh process: Liger patches transformers' classes globally, and a fresh
process gives each variant its own peak memory):
  trl                  TRL default (its fused LM head, no other kernels)
  trl+liger            SFTConfig(use_liger_kernel=True): Liger's layer kernels under TRL's fused head
  fastkern             ``fastkern.patch_model(model)`` with no options, before the trainer is built
  fastkern-after-init  the same line on ``trainer.model`` after ``SFTTrainer(...)`` is built
  fastkern-compile     ``patch_model(model, compile=True)``: the defaults plus regional compilation
  fastkern+compile     the defaults plus ``SFTConfig(torch_compile=True)`` (TRL/Trainer compile the model)
  fastkern-offload     the defaults plus ``checkpointing="offload"``
  reference            unpatched, fp32 weights, TF32 off: the high-precision run the loss rule uses
Modes: lora (r16 on all linear layers), full (full fine-tuning), qlora (NF4 double-quant base as
transformers' BitsAndBytesConfig loads it, LoRA r16), packed (lora with SFTConfig(packing=True) over
documents of mixed length).

Model: Llama-3.2-1B shape, random init, bf16, gradient checkpointing on (TRL's
default), batch 2 x 4096, AdamW, constant lr. Step time: median over the steps after two warm-up steps,
synchronized; memory: torch's peak allocated over the run. Loss accuracy (docs/e2e.md): each variant's
loss trajectory vs the fp32 reference run's, relative deviation, next to TRL default's.

Writes DIR/e2e.json, DIR/e2e.md (the tables) and DIR/e2e.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ["trl", "trl+liger", "fastkern", "fastkern-after-init", "fastkern-compile", "fastkern+compile",
            "fastkern-offload", "reference"]
# Variants that change process-wide state (Liger patches transformers' classes; TRL's torch_compile
# compiles the whole model) always get their own process; with --shared-process the others share one.
ISOLATED = {"trl+liger", "fastkern+compile", "reference"}
MODES = ["lora", "full", "qlora", "packed"]


def _model(args, mode, dtype):
    import torch

    from fastkern.demo import build_model

    if mode != "qlora":
        return build_model(args.size, 128256, dtype).cuda()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    saved = os.path.join(args.work, f"base-{args.size}")
    if not os.path.isdir(saved):
        build_model(args.size, 128256, torch.bfloat16).save_pretrained(saved)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(saved, quantization_config=quant, dtype=dtype,
                                                device_map={"": torch.cuda.current_device()})


def worker(args) -> dict:
    """One variant of one mode in this process; returns the result row."""
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import fastkern
    from fastkern.demo import build_dataset, build_tokenizer

    mode, variant = args.mode, args.variant
    reference = variant == "reference"
    if reference:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float32 if reference else torch.bfloat16
    steps = args.reference_steps if reference or args.accuracy else args.steps
    model = _model(args, mode, dtype)
    if mode in ("lora", "qlora", "packed"):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    report = None
    patch_options = {"fastkern-offload": {"checkpointing": "offload"}, "fastkern-compile": {"compile": True}}.get(variant, {})
    if variant in ("fastkern", "fastkern+compile", "fastkern-offload", "fastkern-compile"):
        report = fastkern.patch_model(model, **patch_options)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    callbacks = [timer := StepTimer()]
    if args.profile:
        callbacks.append(_profiler_callback(TrainerCallback, args.out, f"{mode}-{variant}"))
    packed = mode == "packed"
    n_rows = steps * args.batch * (4 if packed else 1)
    dataset = build_dataset(n_rows, args.length, min_length=args.length // 8 if packed else None)
    out_dir = tempfile.mkdtemp(prefix="fastkern-e2e-")
    config = SFTConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=1e-4 if mode != "full" else 1e-5,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
        max_length=args.length, bf16=not reference, gradient_checkpointing=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, packing=packed, use_liger_kernel=variant == "trl+liger",
        torch_compile=variant == "fastkern+compile",
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=build_tokenizer(),
                         callbacks=callbacks)
    if variant == "fastkern-after-init":
        report = fastkern.patch_model(trainer.model)
    torch.cuda.reset_peak_memory_stats()
    error = None
    try:
        trainer.train()
    except Exception as exc:  # a variant that fails is reported as such, not hidden
        error = f"{type(exc).__name__}: {exc}"[:400]
    shutil.rmtree(out_dir, ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    warm = timer.times[2:] if len(timer.times) > 4 else timer.times
    step_s = statistics.median(warm) if warm else float("nan")
    tokens = args.batch * args.length
    return dict(mode=mode, variant=variant, step_ms=step_s * 1e3, tokens_per_s=tokens / step_s if warm else 0.0,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30, losses=losses, step_times_s=timer.times,
                error=error, report=str(report) if report is not None else "")


def _profiler_callback(base, out, label, first=4, steps=3):
    """Profiles optimizer steps [first, first + steps): prints the CUDA kernels by total device time and
    the device-busy time per step next to the wall time, so host-bound steps show as such."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    class ProfileSteps(base):
        def __init__(self):
            self.prof, self.t0 = None, 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == first:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
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
                self.prof = None

    return ProfileSteps()


def _deviation(losses, reference):
    n = min(len(losses), len(reference))
    if n == 0:
        return float("nan")
    num = sum((a - b) ** 2 for a, b in zip(losses[:n], reference[:n])) ** 0.5
    den = sum(b * b for b in reference[:n]) ** 0.5
    return num / den


def tables(rows: list[dict]) -> str:
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mode_rows = {r["variant"]: r for r in rows if r["mode"] == mode}
        base = mode_rows.get("trl")
        liger = mode_rows.get("trl+liger")
        ref = mode_rows.get("reference")
        lines += [f"### {mode}", "",
                  "| variant | step | tokens/s | vs TRL | vs TRL+Liger | peak | loss dev. vs fp32 ref. | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for variant, r in mode_rows.items():
            ok = not r["error"] and r["tokens_per_s"] > 0
            vs = lambda other: (f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}x"
                                if ok and other and other["tokens_per_s"] > 0 else "")
            dev = _deviation(r["losses"], ref["losses"]) if ref and variant != "reference" and r["losses"] else None
            lines.append(f"| {variant} | {r['step_ms']:.1f} ms | {r['tokens_per_s']:,.0f} | {vs(base)} | {vs(liger)} | "
                         f"{r['peak_gib']:.2f} GiB | {'' if dev is None else f'{dev:.2e}'} | {r['error'] or ''} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    variants = [v for v in VARIANTS if v != "reference" and any(r["variant"] == v for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        ys = []
        for mode in modes:
            base = next((r for r in rows if r["mode"] == mode and r["variant"] == "trl"), None)
            r = next((r for r in rows if r["mode"] == mode and r["variant"] == variant), None)
            ok = r and base and r["tokens_per_s"] > 0 and base["tokens_per_s"] > 0
            ys.append(r["tokens_per_s"] / base["tokens_per_s"] if ok else 0)
        ax.bar([m + i * width for m in range(len(modes))], ys, width, label=variant)
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(modes))], modes)
    ax.set_ylabel("tokens/s vs TRL default")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--modes", default="lora,full,qlora")
    parser.add_argument("--variants", default="trl,trl+liger,fastkern,fastkern-after-init")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--reference-steps", type=int, default=30)
    parser.add_argument("--accuracy", action="store_true", help="every variant runs --reference-steps steps")
    parser.add_argument("--size", default="1b")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--shared-process", action="store_true",
                        help="run the variants that leave no process-wide state in one process (less start-up time)")
    parser.add_argument("--profile", action="store_true", help="print a per-kernel profile of 3 steps per variant")
    parser.add_argument("--work", default=None, help="scratch folder (the saved QLoRA base)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:  # a worker process: one or several variants, one after the other
        import gc

        import torch

        rows = []
        for variant in args.variant.split(","):
            rows.append(worker(argparse.Namespace(**{**vars(args), "variant": variant})))
            gc.collect()
            torch.cuda.empty_cache()
        with open(args.result, "w") as f:
            json.dump(rows, f)
        return
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="fastkern-e2e-work-")
    os.makedirs(work, exist_ok=True)
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; known: {MODES}")
        variants = args.variants.split(",")
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {VARIANTS}")
        shared = [v for v in variants if v not in ISOLATED] if args.shared_process else []
        groups = ([shared] if shared else []) + [[v] for v in variants if v not in shared]
        for group in groups:
            result = os.path.join(work, f"{mode}-{'-'.join(group)}.json")
            cmd = [sys.executable, __file__, "--mode", mode, "--variant", ",".join(group), "--result", result,
                   "--work", work, "--steps", str(args.steps), "--reference-steps", str(args.reference_steps),
                   "--size", args.size, "--length", str(args.length), "--batch", str(args.batch)]
            cmd += ["--accuracy"] if args.accuracy else []
            cmd += ["--profile", "--out", args.out] if args.profile else []
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if args.profile:
                print("\n".join(line for line in proc.stdout.splitlines() if line.strip()), flush=True)
            if proc.returncode != 0 or not os.path.exists(result):
                new = [dict(mode=mode, variant=v, step_ms=float("nan"), tokens_per_s=0.0, peak_gib=0.0, losses=[],
                            step_times_s=[], report="", error=f"worker exit {proc.returncode}: {proc.stderr[-300:]}")
                       for v in group]
            else:
                with open(result) as f:
                    new = json.load(f)
            rows += new
            for r in new:
                print(f"{mode:7s} {r['variant']:20s} {r['step_ms']:8.1f} ms {r['peak_gib']:6.2f} GiB  "
                      f"({time.time() - t0:.0f} s for {','.join(group)}) {r['error'] or ''}", flush=True)
            with open(os.path.join(args.out, "e2e.json"), "w") as f:
                json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    text = tables(rows)
    print(text)
    with open(os.path.join(args.out, "e2e.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(args.out, "e2e.png"))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
