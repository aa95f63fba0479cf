"""`fastkern demo --task grpo`: TRL's GRPOTrainer on a small random-init model, unpatched then patched.

Same task as examples/grpo.py: prompts are three terms of an arithmetic progression of digits modulo
10, the reward is graded on how the completion continues it. Generation runs with transformers'
generate (no vLLM); the table's step time includes it.
"""

from __future__ import annotations

import copy
import random
import statistics
import tempfile

import torch

from .demo_common import (DIGITS, RunResult, build_model, build_tokenizer, cpu_note, device_and_path, peak_memory_text,
                          step_timer)


def build_prompts(n_prompts: int, seed: int = 0):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"prompt": [], "start": [], "step": []}
    for _ in range(n_prompts):
        start, step = rng.randrange(10), rng.randrange(1, 10)
        rows["prompt"].append(" ".join(DIGITS[(start + i * step) % 10] for i in range(3)))
        rows["start"].append(start)
        rows["step"].append(step)
    return Dataset.from_dict(rows)


def progression_reward(prompts, completions, start, step, **kwargs):
    """Mean over the first four completion tokens of: 1 for the digit continuing the progression,
    0.25 for another digit, 0 otherwise."""
    rewards = []
    for completion, a, d in zip(completions, start, step):
        expected = [DIGITS[(a + (3 + i) * d) % 10] for i in range(4)]
        got = completion.split()[:4]
        rewards.append(sum(1.0 if g == e else 0.25 if g in DIGITS else 0.0 for g, e in zip(got, expected)) / 4)
    return rewards


def run_grpo(label: str, model, tokenizer, dataset, args, patch: bool, out_dir: str) -> RunResult:
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    import fastkern

    cuda = torch.cuda.is_available()
    if args.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # the adapters' random init must be the same in both runs
        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear"))
    report = fastkern.patch_model(model, loss=True) if patch else None
    config = GRPOConfig(
        output_dir=out_dir, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=args.batch, num_generations=args.generations,
        max_completion_length=args.length, beta=args.beta, loss_type=args.loss_type, logging_steps=1,
        save_strategy="no", report_to="none", seed=0, data_seed=0, bf16=args.dtype == "bf16",
        gradient_checkpointing=args.gradient_checkpointing, use_cpu=not cuda, disable_tqdm=True,
    )
    timer = step_timer()
    trainer = GRPOTrainer(model=model, reward_funcs=progression_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    rewards = [h["reward"] for h in logs if "reward" in h]
    warm = timer.times[2:] if len(timer.times) > 4 else timer.times
    step_s = statistics.median(warm)
    tail = rewards[-3:]
    tokens = args.batch * args.length
    return RunResult(label, logs[-1]["loss"], [h["loss"] for h in logs], tokens / step_s, step_s, peak_memory_text(),
                     str(report) if report is not None else "",
                     extra=dict(rewards=rewards, final_reward=sum(tail) / len(tail),
                                grad_norms=[h["grad_norm"] for h in logs], entropy=[h["entropy"] for h in logs]))


def format_table(results: list[RunResult]) -> str:
    lines = ["| run | reward (first → mean of last 3) | loss (last) | grad norm (step 1) | step (median, with "
             "generation) | peak memory |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.label} | {r.extra['rewards'][0]:.3f} → {r.extra['final_reward']:.3f} | {r.final_loss:+.5f} "
                     f"| {r.extra['grad_norms'][0]:.5f} | {r.step_s * 1e3:.1f} ms | {r.peak_memory} |")
    return "\n".join(lines)


def run_grpo_demo(args) -> list[RunResult]:
    cuda = torch.cuda.is_available()
    tokenizer = build_tokenizer()
    dataset = build_prompts(args.steps * args.batch)
    results = []
    with tempfile.TemporaryDirectory() as out_dir:
        # bf16 weights for --dtype bf16 (fp32 weights under autocast trip the LoRA patch; see docs/trainers.md).
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        base = build_model(args.size, args.vocab, torch.float32)
        # TRL loads a separate reference model (full fine-tuning, beta > 0) from the checkpoint path.
        base.save_pretrained(f"{out_dir}/init")
        base = type(base).from_pretrained(f"{out_dir}/init", dtype=dtype)
        for label, patch in (("unpatched", False), ("fastkern.patch_model", True)):
            model = copy.deepcopy(base)
            if cuda:
                model = model.cuda()
            results.append(run_grpo(label, model, tokenizer, dataset, args, patch, out_dir))
            del model
            if cuda:
                torch.cuda.empty_cache()
    print(f"\nfastkern demo: TRL GRPOTrainer, Llama-style '{args.size}' model (random init, vocab {args.vocab}), "
          f"{args.steps} steps of {args.batch} completions x {args.length} tokens ({args.generations} per prompt), "
          f"loss {args.loss_type}, beta {args.beta}, {args.dtype}, {device_and_path()}\n")
    print(format_table(results))
    print()
    print(results[1].report)
    if note := cpu_note():
        print(f"\n{note}")
    return results
