"""Where does the dense-LoRA SFT step spend its time with and without the fused LoRA layers?

    python3 bench/probe_lora_e2e_step.py [--steps 8] [--rounds 2] [--trl-like] [--qlora] [--trace DIR]

The TRL SFT bench (bench_sft_e2e.py) measured the dense-LoRA step slower with ``lora`` on (276.7 vs
261.1 ms, H200, 2026-12-04) while the layer bench has the fused layer ahead at M8192. This probe takes
TRL out: the same Llama-1B-shape model (bf16 weights, PEFT LoRA r16 all-linear with PEFT's default
fp32 adapters), batch 2 x 4096, forward + backward under bf16 autocast with non-reentrant gradient
checkpointing, as the Trainer runs it. Patch options are applied to and removed from one model
instance in alternating rounds (so drift of the host or clocks hits every variant alike). Prints the
median step time per variant (CUDA events around each step) and, for ``none`` and ``lora``, the CUDA
kernels of one step by total time.

``--trl-like`` adds what TRL's SFT step in bench_sft_e2e.py has on top: an all-ones attention_mask
(its collator's output for unpadded rows), ``enable_input_require_grads()`` (SFTTrainer calls it for
PEFT models with checkpointing) and an AdamW step; the variants then include ``packing`` (as the SFT
bench's do; a no-op on these unpacked rows). ``--qlora`` loads the base NF4 with double quantization
(transformers' BitsAndBytesConfig, compute dtype bf16) and casts the adapters to bf16, as SFTTrainer
does for quantized models. ``--trace DIR`` also profiles the CPU and writes a chrome trace of the
profiled step per variant there (``trace_<variant>.json``), to see where the GPU idles and what the
host is doing then.
"""

import argparse
import os
import statistics

import torch

import fastkern
from fastkern.demo import build_model

try:
    from bench_sft_e2e import only_options
except ImportError:
    from bench.bench_sft_e2e import only_options


def _options(variant: str) -> dict:
    return only_options("" if variant == "none" else variant)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", default="1b")
    parser.add_argument("--trl-like", action="store_true")
    parser.add_argument("--qlora", action="store_true")
    parser.add_argument("--trace", default=None, help="folder for chrome traces of the profiled steps")
    args = parser.parse_args()
    variants = ("none", "lora", "mlp,rope,packing", "mlp,rope,packing,lora") if args.trl_like else (
        "none", "lora", "mlp,rope", "mlp,rope,lora")
    from peft import LoraConfig, get_peft_model

    model = build_model(args.size, 128256, torch.bfloat16)
    if args.qlora:
        import shutil
        import tempfile

        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        saved = tempfile.mkdtemp(prefix="fastkern-probe-")
        model.save_pretrained(saved)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(saved, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": torch.cuda.current_device()})
        shutil.rmtree(saved, ignore_errors=True)
    else:
        model = model.cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    if args.qlora:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    model.train()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; adapter dtype "
          f"{next(p for n, p in model.named_parameters() if 'lora_A' in n).dtype}")
    ids = torch.randint(0, 128256, (2, 4096), device="cuda")
    extra, optimizer = {}, None
    if args.trl_like:
        extra["attention_mask"] = torch.ones_like(ids)
        model.enable_input_require_grads()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    labels = ids

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels, **extra).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss

    def timed(n):
        out = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        return out

    times = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            fastkern.patch_model(model, **_options(variant))
            timed(2)  # warm-up (first calls compile Triton kernels)
            times[variant] += timed(args.steps)
            fastkern.unpatch_model(model)
    print("\n| variant | step ms (median) | min | max |\n|---|---|---|---|")
    for variant, ts in times.items():
        print(f"| {variant} | {statistics.median(ts):.1f} | {min(ts):.1f} | {max(ts):.1f} |")

    from torch.profiler import ProfilerActivity, profile

    for variant in ("none", "lora"):
        fastkern.patch_model(model, **_options(variant))
        timed(2)
        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.trace else [])
        with profile(activities=activities) as prof:
            step()
            torch.cuda.synchronize()
        fastkern.unpatch_model(model)
        if args.trace:
            prof.export_chrome_trace(os.path.join(args.trace, f"trace_{variant}.json"))
        print(f"\n### {variant}: one step, CUDA kernels by total time")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))


if __name__ == "__main__":
    main()
