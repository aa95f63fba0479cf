"""End-to-end: TRL SFTTrainer on a Llama-1B-shape random-init model, unpatched vs patched, one run.

    python3 bench/bench_sft_e2e.py --out DIR [--steps 12] [--lora 16] [--options mlp=1,loss=1]

Shape (GUIDE.md section 1): hidden 2048, intermediate 8192, 16 layers, 32/8 heads, vocab 128256;
LoRA r16 on all linear layers; gradient checkpointing on; batch 2 x 4096; bf16. Step time is the
median over steps after two warm-up steps, synchronized; peak memory is torch's peak allocated.
Later issues report their effect through this bench (patch options select what is patched).
"""

import argparse
import copy
import json
import os

import torch

from fastkern.demo import build_dataset, build_model, build_tokenizer, format_table, run_sft


def parse_options(text):
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, value = item.split("=")
        out[key] = {"1": True, "0": False, "true": True, "false": False}.get(value.lower(), value)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--size", default="1b")
    parser.add_argument("--lora", type=int, default=16)
    parser.add_argument("--options", default="", help="patch_model options, e.g. mlp=1,loss=1")
    parser.add_argument("--only", default="", help="comma-separated options to enable; every other option off")
    args = parser.parse_args()
    options = parse_options(args.options)
    if args.only:
        from fastkern.patching.core import _patchers

        wanted = set(args.only.split(","))
        options = {p.option: (p.option in wanted) for p in _patchers()} | options
    tokenizer = build_tokenizer()
    dataset = build_dataset(args.steps * args.batch, args.length)
    base = build_model(args.size, 128256, torch.bfloat16)
    results = []
    for label, patch in (("TRL default (unpatched)", False), ("fastkern.patch_model", True)):
        model = copy.deepcopy(base).cuda()
        results.append(run_sft(label, model, tokenizer, dataset, steps=args.steps, batch=args.batch, length=args.length,
                               lr=1e-4, bf16=True, gradient_checkpointing=True, patch=patch, lora=args.lora,
                               patch_options=options))
        del model
        torch.cuda.empty_cache()
    table = format_table(results)
    print(table)
    print(results[1].report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_sft_e2e.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), args=vars(args),
                       results=[dict(label=r.label, step_s=r.step_s, tokens_per_s=r.tokens_per_s, peak=r.peak_memory,
                                     final_loss=r.final_loss, losses=r.losses) for r in results],
                       report=results[1].report), f, indent=1)


if __name__ == "__main__":
    main()
