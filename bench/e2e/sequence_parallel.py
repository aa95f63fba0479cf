"""One long packed sequence per step, sharded over the ranks (fastkern.parallel, Ulysses): step time, tokens/s
and peak memory per rank, against one process running the whole sequence.

    torchrun --nproc-per-node 2 -m bench.e2e.sequence_parallel --size 8b --mode lora --length 262144 --out DIR
    python -m bench.e2e.sequence_parallel --size 8b --mode lora --length 131072 --out DIR   # one GPU, no SP

    torchrun --nproc-per-node 2 -m bench.e2e.sequence_parallel --tiny --out DIR   # CPU smoke test (gloo)

(from the repository root). Each step: one row of --length tokens packed from --documents documents
(position_ids restarting per document, the first token of each unlabelled, as TRL's padding-free collator),
``shard_sequence`` -> forward of the shard -> ``sequence_parallel_loss`` -> backward -> ``sync_gradients``
-> AdamW. The model is patched with ``fastkern.patch_model`` (``--variant plain``: not patched), Llama shape
(--size), random init, bf16 on CUDA, gradient checkpointing on (off with --no-checkpointing), LoRA r16 on all
linear layers or full fine-tuning. Step time: median after --warmup steps, synchronized; tokens/s counts the
whole sequence (T tokens per step for the group); peak: torch's peak allocated per rank (max RSS on CPU).
--tiny also runs the first step's batch through one unsharded copy of the model on every rank and records
the loss difference (``extra.loss_vs_one_process``). Rank 0 writes
DIR/sequence_parallel-<mode>-<variant>-<world>-T<length>.json (bench/schema.py, op ``sequence_parallel``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from bench.e2e import common

SIZES_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=["plain", "fastkern"], default="fastkern")
    p.add_argument("--mode", choices=["lora", "full"], default="lora")
    p.add_argument("--size", choices=["tiny", "1b", "8b"], default="1b")
    p.add_argument("--length", type=int, default=65536, help="tokens of the whole sequence (all ranks together)")
    p.add_argument("--documents", type=int, default=4, help="documents packed into the sequence")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--out", default=".")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 61 tokens, 2 steps, gloo")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.length, args.steps, args.warmup, args.documents = "tiny", 61, 2, 1, 3
    return args


def build_model(args, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastkern.demo import SIZES

    torch.manual_seed(0)
    shape = SIZES_8B if args.size == "8b" else SIZES[args.size]
    config = LlamaConfig(vocab_size=128256 if args.size != "tiny" else 256,
                         max_position_embeddings=max(8192, args.length), **shape)
    config._attn_implementation = "sdpa"
    with device:  # random init on the device: minutes per rank for 8B on the host
        model = LlamaForCausalLM(config).to(dtype)
    if args.checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    report = None
    if args.variant == "fastkern":
        import fastkern

        report = fastkern.patch_model(model)
    return model, report


def packed_row(length: int, documents: int, vocab: int, step: int, device):
    """(input_ids, labels, position_ids) [1, length]: ``documents`` documents of random lengths."""
    g = torch.Generator().manual_seed(1000 + step)
    cuts = torch.randperm(length - 1, generator=g)[:documents - 1].add(1).sort().values.tolist()
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, length])]
    ids = torch.randint(3, vocab, (1, length), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = ids.clone()
    labels[position_ids == 0] = -100
    return ids.to(device), labels.to(device), position_ids.to(device)


def main(argv=None) -> int:
    from fastkern.parallel import enable_sequence_parallel, sequence_parallel_loss, shard_sequence, sync_gradients

    args = parse_args(argv)
    dev = common.device(args.tiny)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, report = build_model(args, dtype, dev)
    sp = enable_sequence_parallel(model, None) if world > 1 else None
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    loss_vs_one_process = None
    if args.tiny:
        # The first step's batch through an unsharded copy (built before any update: the same weights).
        one, _ = build_model(args, dtype, dev)
        ids, labels, position_ids = packed_row(args.length, args.documents, vocab, 0, dev)
        with torch.no_grad():
            reference = one(input_ids=ids, labels=labels, position_ids=position_ids, use_cache=False).loss.item()
        del one

    times, losses = [], []
    common.reset_peak(dev)
    for step in range(args.steps):
        ids, labels, position_ids = packed_row(args.length, args.documents, vocab, step, dev)
        common.sync(dev)
        t0 = time.perf_counter()
        if sp is not None:
            shard = shard_sequence(ids, labels, position_ids)
            out = model(**shard.model_inputs())
            loss = sequence_parallel_loss(out.loss, shard.token_count)
        else:
            loss = model(input_ids=ids, labels=labels, position_ids=position_ids, use_cache=False).loss
        loss.backward()
        if sp is not None:
            sync_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        common.sync(dev)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step == 0 and args.tiny:
            loss_vs_one_process = abs(losses[0] - reference)

    peak = common.peak(dev)
    peaks = [peak["peak_mib"] / 1024]
    if world > 1:
        peaks = [None] * world
        dist.all_gather_object(peaks, peak["peak_mib"] / 1024)
    step_s = statistics.median(times[args.warmup:] or times)
    row = common.schema.make_row(
        common.environment(dev), op="sequence_parallel", case=f"{args.mode} train step",
        shape=f"{args.size} SP x{world} T{args.length} ({args.documents} documents)",
        dtype=str(dtype).removeprefix("torch."), impl=args.variant, ms=step_s * 1e3,
        throughput=args.length / step_s, throughput_unit="tokens/s", peak_mib=max(peaks) * 1024,
        peak_scope=peak["peak_scope"], loss=losses[-1], world=world, peak_gib_per_rank=peaks, losses=losses,
        step_times_s=times, checkpointing=args.checkpointing, loss_vs_one_process=loss_vs_one_process,
        report=str(report or "") + ("\n" + str(sp) if sp is not None else ""))
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        common.write(args.out, f"sequence_parallel-{args.mode}-{args.variant}-{world}-T{args.length}", [row])
        print(f"SP x{world} {args.mode} {args.variant} T{args.length}: {step_s * 1e3:.1f} ms/step, "
              f"{args.length / step_s:,.0f} tokens/s, peak per rank {', '.join(f'{p:.2f}' for p in peaks)} GiB"
              + (f", step-1 loss vs one process {loss_vs_one_process:.2e}" if loss_vs_one_process is not None else ""))
    if sp is not None:
        sp.undo()
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
