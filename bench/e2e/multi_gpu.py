"""TRL SFT under DDP or FSDP2, TRL default vs fastkern: tokens/s over all ranks and peak memory per rank.

One run is one launch (one variant, one mode) with --out DIR (default .); the parallelism is the launcher's:

    accelerate launch --config_file examples/accelerate/ddp.yaml -m bench.e2e.multi_gpu --mode lora --variant fastkern
    accelerate launch --config_file examples/accelerate/fsdp2.yaml -m bench.e2e.multi_gpu --mode full --variant trl
    torchrun --nproc-per-node 2 -m bench.e2e.multi_gpu --mode lora --variant fastkern     # DDP
    python -m bench.e2e.multi_gpu --mode lora --variant fastkern                           # one GPU, the baseline

    torchrun --nproc-per-node 2 -m bench.e2e.multi_gpu --tiny --out DIR     # CPU smoke test (gloo), seconds

(from the repository root).
Variants: trl (TRL 1.16 default: its fused LM head, no other kernels), fastkern (``patch_model(model)``
with no options, before the trainer is built). Modes: lora (r16 on all linear layers), full.
Model: Llama-3.2-1B shape by default, or --size 8b (Llama-3.1-8B shape), random init,
bf16, TRL's default gradient checkpointing, batch 2 x 4096 per rank, AdamW, constant lr. Step time: median
over the steps after --warmup, synchronized; tokens/s counts the tokens of all ranks; peak: torch's peak
allocated per rank (the process's max RSS on the CPU). Rank 0 writes
DIR/multi_gpu-<parallel>-<mode>-<variant>-<world>.json: one row of bench/schema.py (op ``multi_gpu``,
``peak_mib`` the largest rank's peak; every rank's peak, the losses and per-step times in ``extra``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import torch

from bench.e2e import common

SIZES_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=["trl", "fastkern"], default="fastkern")
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--size", choices=["tiny", "1b", "8b"], default="1b")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2, help="rows per rank per step")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--out", default=".")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 16 tokens, 2 steps, gloo")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.length, args.steps, args.warmup = "tiny", 16, 2, 1
    return args


def build_model(size: str, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastkern.demo import SIZES

    torch.manual_seed(0)
    shape = SIZES_8B if size == "8b" else SIZES[size]
    config = LlamaConfig(vocab_size=128256 if size != "tiny" else 256, max_position_embeddings=8192, **shape)
    # Built on the device: random init of an 8B model on the host takes minutes per rank.
    with device:
        return LlamaForCausalLM(config).to(dtype)


def main(argv=None) -> int:
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import fastkern
    from fastkern.demo import build_dataset, build_tokenizer

    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(args.size, dtype, device)
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    report = fastkern.patch_model(model) if args.variant == "fastkern" else None

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="fastkern-multi-gpu-") as out_dir:
        config = SFTConfig(
            output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=1e-4 if args.mode == "lora" else 1e-5, lr_scheduler_type="constant", logging_steps=1,
            save_strategy="no", report_to="none", max_length=args.length, bf16=cuda, use_cpu=not cuda, seed=0,
            data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )
        dataset = build_dataset(args.steps * args.batch * world, args.length)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=build_tokenizer(),
                             callbacks=[timer])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    accelerator = trainer.accelerator
    parallel = ("fsdp2" if getattr(accelerator, "is_fsdp2", False) else
                "ddp" if accelerator.num_processes > 1 else "single")
    # On CPU (--tiny) the process's max RSS stands in, so the field is never an empty 0.
    host_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = (torch.cuda.max_memory_allocated() if cuda else host_rss) / 2**30
    peaks = [peak]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        peaks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(peaks, peak)
    warm = timer.times[args.warmup:] or timer.times
    step_s = statistics.median(warm)
    tokens = args.batch * args.length * accelerator.num_processes
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row = common.schema.make_row(
        common.environment(device), op="multi_gpu", case=f"{args.mode} train step",
        shape=f"{args.size} {parallel} x{accelerator.num_processes} B{args.batch}/rank T{args.length}",
        dtype=str(dtype).removeprefix("torch."), impl=args.variant, ms=step_s * 1e3, throughput=tokens / step_s,
        throughput_unit="tokens/s", peak_mib=max(peaks) * 1024, peak_scope="total" if cuda else "host",
        loss=losses[-1] if losses else None, parallel=parallel, world=accelerator.num_processes,
        peak_gib_per_rank=peaks, losses=losses, step_times_s=list(timer.times), report=str(report or ""))
    if accelerator.is_main_process:
        os.makedirs(args.out, exist_ok=True)
        common.write(args.out, f"multi_gpu-{parallel}-{args.mode}-{args.variant}-{accelerator.num_processes}", [row])
        print(f"{parallel} x{accelerator.num_processes} {args.mode} {args.variant}: {step_s * 1e3:.1f} ms/step, "
              f"{tokens / step_s:,.0f} tokens/s, peak per rank {', '.join(f'{p:.2f}' for p in peaks)} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
