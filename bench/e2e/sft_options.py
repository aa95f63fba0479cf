"""End-to-end, per patch option: TRL SFTTrainer on a Llama-1B-shape random-init model, unpatched vs
patched with chosen options, in one process (bench/e2e/sft.py compares whole variants, one per process).

    python -m bench.e2e.sft_options --out DIR [--steps 12] [--lora 16] [--options mlp=1,loss=1]
    python -m bench.e2e.sft_options --out DIR --variants "mlp;mlp,rope;mlp,lora;mlp,rope,lora,loss"
    python -m bench.e2e.sft_options --out DIR --qlora --variants "mlp,rope,packing;mlp,rope,packing,lora"
    python -m bench.e2e.sft_options --tiny --out DIR     # CPU: tiny model, 2 x 32 tokens, 3 steps

Shape (Llama-3.2-1B): hidden 2048, intermediate 8192, 16 layers, 32/8 heads, vocab 128256;
LoRA r16 on all linear layers; gradient checkpointing on; batch 2 x 4096; bf16. Step time is the
median over steps after two warm-up steps, synchronized; peak memory is torch's peak allocated.
With --qlora the base weights are NF4 with double quantization (bitsandbytes, as transformers'
BitsAndBytesConfig loads them: the random model is saved once and every run loads it quantized),
compute dtype bf16, LoRA on top (PEFT's bnb Linear4bit layers). Writes DIR/sft_options.json: rows of
bench/schema.py (op ``sft_options``, case ``<lora|qlora|full> train step``, impl the run's label, the
patch report and per-step times in ``extra``).
"""

import argparse
import copy
import gc
import os
import shutil
import sys
import tempfile

import torch

from bench.e2e import common
from fastkern.demo import build_dataset, build_model, build_tokenizer, format_table, run_sft

TINY = dict(size="tiny", vocab=256, length=32, batch=2, steps=3)


def parse_options(text):
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, value = item.split("=")
        out[key] = {"1": True, "0": False, "true": True, "false": False}.get(value.lower(), value)
    return out


def only_options(only: str) -> dict:
    """patch_model options with exactly the comma-separated ones in `only` enabled."""
    from fastkern.patching.options import OPTIONS

    wanted = set(filter(None, only.split(",")))
    options = {}
    for option in OPTIONS:
        if option.name == "checkpointing":
            options["checkpointing"] = "offload" if "offload" in wanted else None
        else:
            options[option.name] = option.name in wanted
    unknown = wanted - set(options) - {"offload"}
    if unknown:
        raise SystemExit(f"unknown options {sorted(unknown)}; known: {sorted(options)} and offload")
    return options


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--size", default="1b")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tiny", action="store_true", help="CPU: tiny model, vocab 256, 2 x 32 tokens, 3 steps")
    parser.add_argument("--lora", type=int, default=16)
    parser.add_argument("--options", default="", help="patch_model options, e.g. mlp=1,loss=1")
    parser.add_argument("--only", default="", help="comma-separated options to enable; every other option off")
    parser.add_argument("--variants", default="",
                        help="';'-separated --only sets, each run patched after the one unpatched run")
    parser.add_argument("--mixed", type=int, default=0,
                        help="documents of uniform random length in [MIXED, length] tokens instead of all `length`")
    parser.add_argument("--qlora", action="store_true",
                        help="NF4 (double quant) base weights through BitsAndBytesConfig; needs --lora > 0")
    parser.add_argument("--packing", action="store_true",
                        help="SFTConfig(packing=True): documents packed padding-free into rows of `length`")
    args = parser.parse_args(argv)
    if args.tiny:
        vars(args).update(TINY)
    return args


def row(env, args, result, device) -> dict:
    """The schema row of one run (``run_sft``'s result)."""
    mode = "qlora" if args.qlora else "lora" if args.lora else "full"
    return common.schema.make_row(
        env, op="sft_options", case=f"{mode} train step", shape=f"{args.size} B{args.batch} T{args.length}",
        dtype="bfloat16" if device.type == "cuda" else "float32", impl=result.label, ms=result.step_s * 1e3,
        throughput=result.tokens_per_s, throughput_unit="tokens/s", loss=result.losses[-1] if result.losses else None,
        losses=result.losses, report=result.report, **result.extra, **common.peak(device))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.device()
    runs = [("TRL default (unpatched)", False, {})]
    if args.variants:
        for only in args.variants.split(";"):
            if only == "unpatched":  # again, after the patched runs: shows whether run order matters
                runs.append(("TRL default (unpatched, again)", False, {}))
                continue
            runs.append((f"patched: {only}", True, only_options(only) | parse_options(args.options)))
    else:
        options = parse_options(args.options)
        if args.only:
            options = only_options(args.only) | options
        runs.append(("fastkern.patch_model", True, options))
    env = common.environment(device)
    tokenizer = build_tokenizer()
    n_rows = args.steps * args.batch
    if args.mixed:
        # Enough documents to fill every packed row; the padded alternative pads each batch to its longest.
        n_rows = int(n_rows * 2.5 * args.length / (args.mixed + args.length)) + args.batch
    dataset = build_dataset(n_rows, args.length, min_length=args.mixed or None)
    if args.mixed:
        lengths = [len(t.split()) + 1 for t in dataset["text"]]
        padded = sum(max(lengths[i:i + args.batch]) * len(lengths[i:i + args.batch])
                     for i in range(0, len(lengths), args.batch))
        print(f"mixed lengths {args.mixed}..{args.length}: {len(lengths)} documents, padding would be "
              f"{1 - sum(lengths) / padded:.1%} of a padded batch of {args.batch} (removed by packing)", flush=True)
    if args.qlora and not args.lora:
        raise SystemExit("--qlora trains LoRA adapters on the quantized base: give --lora > 0")
    base = build_model(args.size, args.vocab, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.qlora:
        saved = tempfile.mkdtemp(prefix="fastkern-qlora-")
        base.save_pretrained(saved)
        del base

        def fresh_model():
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16)
            place = torch.cuda.current_device() if device.type == "cuda" else "cpu"
            return AutoModelForCausalLM.from_pretrained(saved, quantization_config=quant, dtype=torch.bfloat16,
                                                        device_map={"": place})
    else:
        def fresh_model():
            return copy.deepcopy(base).to(device)
    results = []
    for label, patch, options in runs:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            print(f"{label}: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated before the model", flush=True)
        model = fresh_model()
        results.append(run_sft(label, model, tokenizer, dataset, steps=args.steps, batch=args.batch, length=args.length,
                               lr=1e-4, bf16=device.type == "cuda", gradient_checkpointing=True, patch=patch, lora=args.lora,
                               patch_options=options, packing=args.packing))
        results[-1] = (results[-1], row(env, args, results[-1], device))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(format_table([results[-1][0]]), flush=True)
    print(format_table([r for r, _ in results]))
    for r, _ in results[1:]:
        print(r.label, "\n", r.report)
    if args.qlora:
        shutil.rmtree(saved, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    print("wrote", common.write(args.out, "sft_options", [r for _, r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
