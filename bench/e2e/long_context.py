"""Long-context training on one GPU: peak memory and step time of one LoRA / QLoRA step per sequence length,
the longest trainable sequence (``--search``) and the extrapolation to full depth (``--extrapolate``).

    python -m bench.e2e.long_context --size 8b --qlora --layers 2 --lengths 65536 131072 262144 524288 --out DIR
    python -m bench.e2e.long_context --size 8b --qlora --layers 2 --trainer trl --variant unpatched --search --out DIR
    python -m bench.e2e.long_context --extrapolate DIR_L2 DIR_L4 [--full DIR_FULL] --out DIR
    python -m bench.e2e.long_context --tiny --out DIR      # CPU, seconds (= --size tiny; the tests run this)

Model: Llama-3.1-8B's shape (hidden 4096, intermediate 14336, 32 layers, 32/8 heads, vocab 128256),
Llama-3.2-1B's (2048, 8192, 16 layers, tied embeddings), Qwen3-8B's (4096, 12288, 36 layers, 32/8 heads
of 128, q/k norms, vocab 151936), or a tiny one; random init, built directly in bf16 on the device.
``--layers`` keeps fewer decoder layers: a full-depth 8B step at 512K tokens is ~15 minutes of attention
alone, so per-layer and fixed costs are measured at 2 and 4 layers and extrapolated
(docs/long_context.md gives the formula; ``--extrapolate`` writes such rows, labelled extrapolated).
``--qlora``: every decoder Linear becomes a bitsandbytes NF4 Linear4bit with double quantization (needs
bitsandbytes). LoRA r16 (``--lora-r``) on all linear layers via PEFT, AdamW.

Trainer (``--trainer``): ``loop`` (default, cheaper): forward, backward, AdamW step; ``trl``: TRL's
SFTTrainer, padding-free, batch 1, one step, TRL's gradient checkpointing (long_context_step.py).
Variants (``--variant``): ``long`` (default): ``patch_model(model, checkpointing="offload")``, i.e. every
default (tiled_mlp "auto" included; ``--tiled-mlp on/off`` forces it) plus checkpointed decoder layers whose
inputs wait in host memory (``--host-gib`` caps their pinned pool); ``defaults``: ``patch_model(model)``
with transformers' own checkpointing (inputs stay on the GPU); ``unpatched``: transformers (and TRL) alone.

Per length, batch 1, one sequence of random token ids as input and labels: one untimed warm-up step at
``--warmup-len`` compiles the kernels; then one training step is timed (CUDA synchronized) with the peak of
torch.cuda.max_memory_allocated / reserved over the step, the process's peak host RSS, the offloader's
host pool and the attention kernels that ran (aten op names through torch.profiler, CPU activity only).
On the CPU the device peak is replaced by a tracked peak of live tensors (long_context_step.TrackedPeak).
The first failure ends a sweep (recorded, not raised); so does ``--time-budget-s`` (a length whose step,
estimated from the last one as quadratic in the length, would end past it).
``--memory-cap-gib`` / ``--memory-cap-mib`` caps the device memory through
torch.cuda.set_per_process_memory_fraction; on the CPU a step whose tracked peak passes the cap counts as
out of memory (a simulated cap, so that ``--search`` can be run and tested without a GPU).
Writes DIR/long_context.json (after every length, so a run cut short keeps what it measured): rows of
bench/schema.py (op ``long_context``, case the training, shape the model and length, impl the variant,
``peak_mib`` torch's peak allocated on CUDA or the tracked peak on the CPU; reserved memory, host RSS,
the offloader's pool, the attention backend in ``extra``), prints a markdown table, and with ``--plot PNG``
draws peak memory against sequence length per variant (needs matplotlib).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource

import torch

from bench.e2e import common
from bench.e2e.long_context_step import STEPPERS, AttentionBackends, TrackedPeak

_LLAMA_ROPE = dict(rope_theta=500000.0)
SIZES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, **_LLAMA_ROPE),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, **_LLAMA_ROPE),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                     rope_theta=1000000.0),
    # in_features multiples of 64 (bitsandbytes' blocksize) so --qlora works on CPU too
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False, rope_theta=10000.0),
}
FAMILY = {"qwen3-8b": "qwen3"}  # everything else: llama
DEFAULT_LENGTHS = {"8b": [65536, 131072, 262144, 524288], "1b": [131072, 262144, 524288, 1048576],
                   "qwen3-8b": [65536, 131072, 262144, 524288], "tiny": [64, 128]}
VARIANTS = ("long", "defaults", "unpatched")
TRAINERS = tuple(STEPPERS)
GIB, MIB = 1 << 30, 1 << 20


def build_model(size: str, layers: int | None, max_len: int, device: torch.device, qlora: bool):
    import transformers

    shape = dict(SIZES[size])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    family = FAMILY.get(size, "llama")
    config_cls, model_cls = ((transformers.Qwen3Config, transformers.Qwen3ForCausalLM) if family == "qwen3" else
                             (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    config = config_cls(max_position_embeddings=max(max_len, 8192), **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    # Built on the device in bf16: an 8B model initialised on the CPU in fp32 takes minutes and 32 GB.
    with torch.device(device):
        model = model_cls._from_config(config, dtype=torch.bfloat16)
    if qlora:
        _quantize_decoder_linears(model, device)
    return model


def _quantize_decoder_linears(model, device: torch.device) -> None:
    """Every nn.Linear of the decoder layers -> bitsandbytes NF4 Linear4bit (double quant, bf16 compute),
    one at a time so the bf16 copy of only one weight is alive besides the quantized model."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data,
                                             requires_grad=False, compress_statistics=True, quant_type="nf4")
                if child.bias is not None:
                    q.bias = child.bias
                setattr(parent, name, q.to(device))
                del child
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_lora(model, r: int):
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


TILED = {"auto": "auto", "on": True, "off": False}


def patch_options(variant: str, tiled: str = "auto", host_gib: float | None = None,
                  min_mib: float | None = None) -> dict | None:
    """patch_model's keyword arguments for a variant (None: not patched)."""
    if variant == "unpatched":
        return None
    options = dict(tiled_mlp=TILED[tiled])
    if variant == "long":
        offload = {"offload": True}
        if host_gib is not None:
            offload["host_bytes"] = int(host_gib * GIB)
        if min_mib is not None:
            offload["min_bytes"] = int(min_mib * (1 << 20))
        options["checkpointing"] = offload if len(offload) > 1 else "offload"
    return options


def prepare(model, variant: str, tiled: str = "auto", trainer: str = "loop", host_gib: float | None = None,
            min_mib: float | None = None) -> str:
    """Patch (or not) and, for the plain loop, turn transformers' checkpointing on (TRL turns it on itself,
    through the offloading setter where the long variant installed it); returns the report text."""
    import fastkern

    options = patch_options(variant, tiled, host_gib, min_mib)
    if trainer == "loop" and variant != "long":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return "unpatched" if options is None else str(fastkern.patch_model(model, **options))


def _host_rss_gib() -> float:
    # ru_maxrss: the process's peak resident set (KiB on Linux): pinned host buffers count once touched.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def _offload_pool_gib(model) -> float | None:
    from fastkern.patching.checkpointing import model_offloader

    offloader = model_offloader(model)
    return None if offloader is None else offloader.pool.bytes_held / GIB


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def measure(stepper, seq_len: int, device: torch.device, cap_bytes: int | None = None) -> dict:
    """One timed step at ``seq_len``; on the CPU a tracked peak over ``cap_bytes`` is reported as out of memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    backends = AttentionBackends()
    tracker = None if cuda else TrackedPeak(*stepper.tracked())
    with backends:
        if tracker is None:
            loss, step_s = stepper.step(seq_len)
        else:
            with tracker:
                loss, step_s = stepper.step(seq_len)
    ok = math.isfinite(loss)
    row = dict(seq_len=seq_len, ok=ok, loss=loss, step_s=round(step_s, 4), tokens_per_s=round(seq_len / step_s, 1),
               host_peak_rss_gib=round(_host_rss_gib(), 3), offload_pool_gib=_offload_pool_gib(stepper.model),
               attention_backend=backends.label, error=None if ok else "loss not finite")
    if cuda:
        row.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 3),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 3),
                   before_step_gib=round(base / GIB, 3))
    else:
        row["tracked_peak_mib"] = None if tracker.peak_mib is None else round(tracker.peak_mib, 3)
        if cap_bytes is not None and tracker.peak_mib is not None and tracker.peak_mib * MIB > cap_bytes:
            row.update(ok=False, error=f"out of memory (simulated cap: tracked peak {tracker.peak_mib:.2f} MiB > "
                                       f"{cap_bytes / MIB:.2f} MiB)")
    return row


def probe(stepper, seq_len: int, device: torch.device, cap_bytes: int | None) -> dict:
    """``measure`` isolated: any failure becomes a row (out of memory named as such) and whatever the step
    left (a failed step's frames, the trainer, cached blocks) is freed before the next one."""
    try:
        row = measure(stepper, seq_len, device, cap_bytes)
    except Exception as exc:  # noqa: BLE001 - recorded as the row's error
        row = dict(seq_len=seq_len, ok=False, error="out of memory" if is_oom(exc) else repr(exc)[:500])
    stepper.free()  # after the except block: the exception, its traceback and their tensors are gone
    return row


def cap_bytes(args) -> int | None:
    if args.memory_cap_gib is not None:
        return int(args.memory_cap_gib * GIB)
    return None if args.memory_cap_mib is None else int(args.memory_cap_mib * MIB)


def setup(args, max_len: int):
    """Device (with its cap), model, LoRA, patches, stepper and the result header."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # the cap and the memory stats need an index
        device = torch.device("cuda", torch.cuda.current_device())
    cap = cap_bytes(args)
    if cap is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    model = build_model(args.size, args.layers, max_len, device, args.qlora)
    model = add_lora(model, args.lora_r)
    report = prepare(model, args.variant, args.tiled_mlp, args.trainer, args.host_gib, args.min_mib)
    model.train()
    stepper = STEPPERS[args.trainer](model, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = dict(size=args.size, layers=model.config.num_hidden_layers, full_layers=SIZES[args.size]["num_hidden_layers"],
               hidden=SIZES[args.size]["hidden_size"], qlora=args.qlora, lora_r=args.lora_r, variant=args.variant,
               trainer=args.trainer, tiled_mlp=args.tiled_mlp, host_gib=args.host_gib, min_mib=args.min_mib,
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               device_type=device.type, torch=torch.__version__, memory_cap_gib=None if cap is None else cap / GIB,
               trainable_params=trainable, report=report, results=[])
    return device, cap, stepper, out


def warm_up(stepper, args, first_len: int, out: dict) -> bool:
    """One untimed step (kernel compilation, allocator warm-up); False (recorded) if it fails."""
    n = min(first_len, args.warmup_len)
    try:
        stepper.step(n)
    except Exception as exc:  # noqa: BLE001 - recorded, nothing can be measured after it
        out["results"].append(dict(seq_len=n, ok=False, error=f"warm-up: {exc!r}"[:500]))
        stepper.free()
        return False
    stepper.free()
    return True


def run(args, save=lambda result: None) -> dict:
    import time

    lengths = sorted(args.lengths or DEFAULT_LENGTHS[args.size])
    device, cap, stepper, out = setup(args, lengths[-1])
    started = time.perf_counter()
    if not warm_up(stepper, args, lengths[0], out):
        return out
    last_s, last_len = 0.0, 1
    for seq_len in lengths:
        estimate = last_s * max(1.0, (seq_len / last_len) ** 2)  # attention dominates a long step: ~T²
        if args.time_budget_s and time.perf_counter() - started + estimate > args.time_budget_s:
            out["results"].append(dict(seq_len=seq_len, ok=False, error="skipped: time budget"))
            break
        row = probe(stepper, seq_len, device, cap)
        out["results"].append(row)
        save(out)  # a sweep cut short by the device's time limit still leaves the lengths done
        if not row["ok"]:
            break
        last_s, last_len = row["step_s"], seq_len
    return out


def table(result: dict) -> str:
    lines = [f"{result['size']} x{result['layers']} layers, {'QLoRA NF4' if result['qlora'] else 'LoRA bf16'} "
             f"r{result['lora_r']}, {result['trainer']}, variant {result['variant']}, {result['device']}",
             "| tokens | ok | step s | tokens/s | peak alloc GiB | peak reserved GiB | tracked peak MiB | host RSS GiB "
             "| attention | loss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        if r.get("summary"):
            continue
        if "step_s" in r:
            lines.append(f"| {r['seq_len']} | {r['ok']} | {r['step_s']} | {r['tokens_per_s']} | "
                         f"{r.get('peak_allocated_gib', '-')} | {r.get('peak_reserved_gib', '-')} | "
                         f"{r.get('tracked_peak_mib', '-')} | {r['host_peak_rss_gib']} | {r['attention_backend']} | "
                         f"{r['loss']:.4f} |" + (f" {r['error']}" if r.get("error") else ""))
        else:
            lines.append(f"| {r['seq_len']} | False | {r['error']} | | | | | | | |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="8b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--qlora", action="store_true", help="NF4 (double quant) decoder linears via bitsandbytes")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--trainer", choices=TRAINERS, default="loop", help="plain loop, or TRL's SFTTrainer (padding-free)")
    p.add_argument("--variant", choices=VARIANTS, default="long")
    p.add_argument("--tiled-mlp", choices=sorted(TILED), default="auto", help="patch_model's tiled_mlp option")
    p.add_argument("--host-gib", type=float, default=None,
                   help="long variant: host budget of the offloaded checkpoints (default: the offloader's own)")
    p.add_argument("--min-mib", type=float, default=None,
                   help="long variant: layer inputs below this many MiB stay on the device, run as the default "
                        "recompute (the long-context recipe uses 256; default: the offloader's own, 1 MiB)")
    p.add_argument("--memory-cap-gib", type=float, default=None)
    p.add_argument("--memory-cap-mib", type=float, default=None, help="the cap in MiB (the CPU's simulated cap)")
    p.add_argument("--time-budget-s", type=float, default=540.0)
    p.add_argument("--warmup-len", type=int, default=2048)
    p.add_argument("--search", action="store_true", help="binary search of the longest trainable sequence")
    p.add_argument("--granularity", type=int, default=4096, help="--search: step of the lengths probed")
    p.add_argument("--search-max", type=int, default=1 << 22, help="--search: longest length probed")
    p.add_argument("--search-start", type=int, default=None, help="--search: first length (default: plan_memory's)")
    p.add_argument("--extrapolate", nargs=2, metavar=("DIR_A", "DIR_B"), default=None,
                   help="results of two runs at fewer layers (e.g. 2 and 4): extrapolate to full depth")
    p.add_argument("--full", default=None, help="--extrapolate: results of full-depth runs to compare with")
    p.add_argument("--plot", default=None, help="also draw peak memory vs sequence length to this PNG")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=".")
    p.add_argument("--tiny", action="store_true", help="CPU, the tiny shape (--size tiny --device cpu)")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.device = "tiny", "cpu"
    if args.memory_cap_gib is not None and args.memory_cap_mib is not None:
        p.error("give --memory-cap-gib or --memory-cap-mib, not both")
    return args


def describe(result: dict, what: str = "step") -> tuple[str, str]:
    """(case, impl) of a run's rows; ``what``: "step" (a measured step) or the search's summary."""
    case = f"{'QLoRA NF4' if result['qlora'] else 'LoRA bf16'} r{result['lora_r']}"
    case += " TRL SFT (padding-free)" if result.get("trainer") == "trl" else " train"
    case += f" {what}"
    impl = result["variant"]
    if impl != "unpatched":
        impl += f" (tiled_mlp {result['tiled_mlp']})"
    return case, impl


def schema_rows(result: dict) -> list[dict]:
    """The run's rows in bench/schema.py's schema (the search's summary row included)."""
    cuda = result["device_type"] == "cuda"
    env = common.environment(torch.device(result["device_type"]))
    case, impl = describe(result)
    where = dict(size=result["size"], layers=result["layers"], full_layers=result.get("full_layers"),
                 hidden=result.get("hidden"), variant=result["variant"], trainer=result.get("trainer", "loop"))
    common_extra = dict(memory_cap_gib=result["memory_cap_gib"], trainable_params=result["trainable_params"],
                        report=result["report"], host_gib=result.get("host_gib"), min_mib=result.get("min_mib"),
                        **where)
    rows = []
    for r in result["results"]:
        if r.get("summary"):
            from bench.e2e.long_context_search import summary_row

            rows.append(summary_row(env, result, r, describe(result, "longest trainable sequence")[0], impl,
                                    common_extra))
            continue
        shape = f"{result['size']} x{result['layers']} layers T{r['seq_len']}"
        if "step_s" not in r:
            rows.append(common.schema.make_row(env, op="long_context", case=case, shape=shape, dtype="bfloat16",
                                               impl=impl, error=r["error"], seq_len=r["seq_len"], **common_extra))
            continue
        peak = r.get("peak_allocated_gib") if cuda else r.get("tracked_peak_mib")
        peak_mib = None if peak is None else (peak * 1024 if cuda else peak)
        extra = {k: v for k, v in r.items() if k not in ("step_s", "tokens_per_s", "loss", "error")}
        rows.append(common.schema.make_row(
            env, op="long_context", case=case, shape=shape, dtype="bfloat16", impl=impl, ms=r["step_s"] * 1e3,
            throughput=r["tokens_per_s"], throughput_unit="tokens/s", loss=r["loss"], peak_mib=peak_mib,
            peak_scope="total" if cuda else "host", error=r.get("error"), **extra, **common_extra))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.extrapolate:
        from bench.e2e.long_context_search import extrapolate_main

        return extrapolate_main(args)
    if args.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            print("--qlora needs bitsandbytes; not installed")
            return 2

    def save(result):
        return common.write(args.out, "long_context", schema_rows(result))

    if args.search:
        from bench.e2e.long_context_search import run_search

        result = run_search(args, save)
    else:
        result = run(args, save)
    path = save(result)
    print(table(result))
    print(f"wrote {path}")
    if args.plot:
        from bench.plot import memory_vs_length_png

        memory_vs_length_png(common.schema.read(path), args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
