"""`fastkern demo --task dpo`: TRL's DPOTrainer on a small random-init model, unpatched then patched.

Same data as examples/dpo.py: the prompt is three terms of an arithmetic progression of digits modulo
10, the chosen completion continues it, the rejected one is random digits. With --lora the reference
log-probs come from the same model under PEFT's disable_adapter(); without it a separate copy of the
initial model is the reference (patched too in the patched run).
"""

from __future__ import annotations

import copy
import random
import statistics
import tempfile

import torch

from .demo_common import (DIGITS, RunResult, build_model, build_tokenizer, cpu_note, device_and_path, peak_memory_text,
                          step_timer)


def build_pairs(n_pairs: int, completion_tokens: int = 4, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n_pairs):
        start, step = rng.randrange(10), rng.randrange(1, 10)
        seq = [DIGITS[(start + i * step) % 10] for i in range(3 + completion_tokens)]
        rows["prompt"].append(" ".join(seq[:3]))
        rows["chosen"].append(" " + " ".join(seq[3:]))
        rows["rejected"].append(" " + " ".join(rng.choice(DIGITS) for _ in range(completion_tokens)))
    return Dataset.from_dict(rows)


def run_dpo(label: str, model, ref_model, tokenizer, dataset, args, patch: bool, out_dir: str) -> RunResult:
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    import fastkern

    cuda = torch.cuda.is_available()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # the adapters' random init must be the same in both runs
        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear"))
    report = fastkern.patch_model(model, loss=True) if patch else None
    if patch and ref_model is not None:
        fastkern.patch_model(ref_model, loss=True)
    config = DPOConfig(
        output_dir=out_dir, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=args.batch, beta=args.beta, loss_type=["sigmoid"], max_length=args.length,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, data_seed=0, bf16=args.dtype == "bf16",
        gradient_checkpointing=args.gradient_checkpointing, use_cpu=not cuda, disable_tqdm=True,
    )
    timer = step_timer()
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    warm = timer.times[2:] if len(timer.times) > 4 else timer.times
    step_s = statistics.median(warm)
    tail = logs[-3:]
    tokens = 2 * args.batch * args.length  # upper bound: chosen + rejected rows, padded to at most --length
    return RunResult(label, sum(h["loss"] for h in tail) / len(tail), [h["loss"] for h in logs], tokens / step_s,
                     step_s, peak_memory_text(), str(report) if report is not None else "",
                     extra=dict(margins=[h["rewards/margins"] for h in logs],
                                accuracy=sum(h["rewards/accuracies"] for h in tail) / len(tail)))


def format_table(results: list[RunResult]) -> str:
    lines = ["| run | loss (first → mean of last 3) | margin (last) | accuracy (last 3) | step (median) | peak memory |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.label} | {r.losses[0]:.4f} → {r.final_loss:.4f} | {r.extra['margins'][-1]:+.4f} | "
                     f"{r.extra['accuracy']:.2f} | {r.step_s * 1e3:.1f} ms | {r.peak_memory} |")
    return "\n".join(lines)


def run_dpo_demo(args) -> list[RunResult]:
    cuda = torch.cuda.is_available()
    tokenizer = build_tokenizer()
    dataset = build_pairs(args.steps * args.batch)
    # bf16 weights for --dtype bf16 (fp32 weights under autocast trip the LoRA patch; see docs/trainers.md).
    base = build_model(args.size, args.vocab, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    results = []
    with tempfile.TemporaryDirectory() as out_dir:
        for label, patch in (("unpatched", False), ("fastkern.patch_model", True)):
            model = copy.deepcopy(base)
            ref_model = None if args.lora else copy.deepcopy(base).eval()
            if cuda:
                model = model.cuda()
                ref_model = None if ref_model is None else ref_model.cuda()
            results.append(run_dpo(label, model, ref_model, tokenizer, dataset, args, patch, out_dir))
            del model, ref_model
            if cuda:
                torch.cuda.empty_cache()
    ref = "the PEFT model under disable_adapter()" if args.lora else "a separate copy"
    print(f"\nfastkern demo: TRL DPOTrainer (sigmoid), Llama-style '{args.size}' model (random init, vocab "
          f"{args.vocab}), {args.steps} steps of {args.batch} pairs (max {args.length} tokens), reference: {ref}, "
          f"{args.dtype}, {device_and_path()}\n")
    print(format_table(results))
    print()
    print(results[1].report)
    if note := cpu_note():
        print(f"\n{note}")
    return results
