"""`fastkern demo`: fine-tune a small random-init model with TRL's SFTTrainer, unpatched then patched.

The data is generated in code (fastkern/demo_common.py): each line is an arithmetic progression of digits modulo 10
("3 5 7 9 1 ..."), so the next token follows from the previous two and the loss falls within a few
dozen steps. The tokenizer is a word-level vocabulary built in code: nothing is downloaded.

The same code drives the end-to-end bench (bench/e2e/sft_options.py) at the Llama-1B shape.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile

import torch

# Re-exported: the benches and tests build their models and data through fastkern.demo.
from .demo_common import (DIGITS, SIZES, MissingExtraError, RunResult, build_dataset, build_model,  # noqa: F401
                          build_tokenizer, cpu_note, device_and_path, peak_memory_text, quiet_bitsandbytes_cpu_notice,
                          require_peft, require_trl, step_timer)


def run_sft(label: str, model, tokenizer, dataset, *, steps: int, batch: int, length: int, lr: float,
            bf16: bool, gradient_checkpointing: bool, patch: bool, lora: int | None = None,
            patch_options: dict | None = None, packing: bool = False) -> RunResult:
    from trl import SFTConfig, SFTTrainer

    import fastkern

    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # the same adapter init in the unpatched and the patched run
        model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, target_modules="all-linear", lora_dropout=0.0))
    report = fastkern.patch_model(model, **(patch_options or {})) if patch else None
    timer = step_timer()
    with tempfile.TemporaryDirectory() as out_dir:
        config = SFTConfig(
            output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none",
            max_length=length, bf16=bf16, gradient_checkpointing=gradient_checkpointing, seed=0, data_seed=0,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
            packing=packing,  # TRL's best-fit-decreasing packing: padding-free rows of documents
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the table below is the output
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    warm = timer.times[2:] if len(timer.times) > 4 else timer.times
    step_s = statistics.median(warm)
    tail = losses[-3:] if len(losses) >= 3 else losses
    return RunResult(label, sum(tail) / len(tail), losses, batch * length / step_s, step_s, peak_memory_text(),
                     str(report) if report is not None else "", extra={"step_times_s": list(timer.times)})


def format_table(results: list[RunResult]) -> str:
    lines = ["| run | final loss (mean of last 3 logs) | first loss | step (median) | tokens/s | peak memory |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.label} | {r.final_loss:.4f} | {r.losses[0]:.4f} | {r.step_s * 1e3:.1f} ms | "
                     f"{r.tokens_per_s:,.0f} | {r.peak_memory} |")
    return "\n".join(lines)


# Per-task defaults (CPU, CUDA) for the options left unset on the command line.
TASK_DEFAULTS = {
    "sft": dict(steps=(30, 60), batch=(4, 8), length=(64, 512), vocab=(256, 32000), lr=(2e-3, 2e-3)),
    # batch: completions per step; length: max completion tokens (generation on CPU must stay short)
    "grpo": dict(steps=(8, 40), batch=(4, 16), length=(8, 128), vocab=(32, 32000), lr=(1e-3, 1e-4)),
    # batch: preference pairs per step; length: max prompt + completion tokens
    "dpo": dict(steps=(10, 60), batch=(4, 8), length=(64, 512), vocab=(256, 32000), lr=(1e-3, 1e-4)),
}


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="fastkern demo", description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=list(TASK_DEFAULTS), default="sft",
                        help="sft: SFTTrainer; grpo: GRPOTrainer with a programmatic reward; dpo: DPOTrainer")
    parser.add_argument("--size", choices=list(SIZES), default="small" if cuda else "tiny")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None,
                        help="model vocabulary (the data uses 14 tokens; a larger vocab makes the head realistic)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--lora", type=int, default=None, help="LoRA rank on all linear layers (default: full fine-tuning)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--generations", type=int, default=None, help="grpo: completions per prompt (4 CPU, 8 GPU)")
    parser.add_argument("--beta", type=float, default=None, help="grpo: KL coefficient (0); dpo: beta (0.1)")
    parser.add_argument("--loss-type", default="dapo", help="grpo: TRL loss_type")
    args = parser.parse_args(argv)
    for key, (cpu_value, cuda_value) in TASK_DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, cuda_value if cuda else cpu_value)
    if args.generations is None:
        args.generations = 8 if cuda else 4
    if args.beta is None:
        args.beta = 0.1 if args.task == "dpo" else 0.0
    return args


def main(argv=None) -> int:
    quiet_bitsandbytes_cpu_notice()
    args = parse_args(argv)
    try:
        run_demo(args)
    except MissingExtraError as exc:
        print(f"fastkern demo: {exc}", file=sys.stderr)
        return 1
    return 0


def run_demo(args) -> list[RunResult]:
    require_trl()
    if args.lora:
        require_peft()
    if args.task == "grpo":
        from .demo_grpo import run_grpo_demo

        return run_grpo_demo(args)
    if args.task == "dpo":
        from .demo_dpo import run_dpo_demo

        return run_dpo_demo(args)
    cuda = torch.cuda.is_available()
    tokenizer = build_tokenizer()
    dataset = build_dataset(args.steps * args.batch, args.length)
    base = build_model(args.size, args.vocab, torch.float32)
    results = []
    for label, patch in (("unpatched", False), ("fastkern.patch_model", True)):
        model = copy.deepcopy(base)
        if cuda:
            model = model.cuda()
        result = run_sft(label, model, tokenizer, dataset, steps=args.steps, batch=args.batch, length=args.length,
                         lr=args.lr, bf16=args.dtype == "bf16", gradient_checkpointing=args.gradient_checkpointing,
                         patch=patch, lora=args.lora)
        results.append(result)
        del model
        if cuda:
            torch.cuda.empty_cache()
    print(f"\nfastkern demo: TRL SFTTrainer, Llama-style '{args.size}' model (random init), {args.steps} steps of "
          f"{args.batch}x{args.length} tokens, {args.dtype}, {device_and_path()}\n")
    print(format_table(results))
    print()
    print(results[1].report)
    if note := cpu_note():
        print(f"\n{note}")
    first, last = results[1].losses[0], results[1].final_loss
    print(f"\nloss fell from {first:.3f} to {last:.3f} (patched); unpatched ended at {results[0].final_loss:.3f}")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
