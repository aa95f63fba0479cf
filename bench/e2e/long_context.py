"""Long-context training on one GPU: peak memory and step time of one LoRA / QLoRA step per sequence length.

    python -m bench.e2e.long_context --size 8b --qlora --layers 2 --lengths 65536 131072 262144 524288 --out DIR
    python -m bench.e2e.long_context --size 1b --lengths 131072 262144 524288 1048576 --out DIR
    python -m bench.e2e.long_context --tiny --out DIR      # CPU, seconds (= --size tiny; the tests run this)

Model: Llama-3.1-8B's shape (hidden 4096, intermediate 14336, 32 layers, 32/8 heads, vocab 128256), or
Llama-3.2-1B's (2048, 8192, 16 layers, 32/8 heads, tied embeddings), or a tiny one; random init, built
directly in bf16 on the device. ``--layers`` keeps fewer decoder layers: a full-depth 8B step at 512K
tokens is ~15 minutes of attention alone, past one device call, so per-layer and fixed costs are measured
at 2, 4, 8 layers and extrapolated (docs/long_context.md gives the formula; label such numbers as
extrapolated). ``--qlora``: every decoder Linear becomes a bitsandbytes NF4 Linear4bit with double
quantization (needs bitsandbytes). LoRA r16 (``--lora-r``) on all linear layers via PEFT, AdamW.

Variants (``--variant``): ``long`` (default): ``patch_model(model, checkpointing="offload")``, i.e. every
default (tiled_mlp "auto" included; ``--tiled-mlp on/off`` forces it) plus checkpointed decoder layers whose inputs wait in host memory;
``defaults``: ``patch_model(model)`` with transformers' own checkpointing (inputs stay on the GPU);
``unpatched``: transformers alone, with its checkpointing.

Per length, batch 1, one row of random token ids as input and labels: one untimed warm-up step at the
first length compiles the kernels; then one training step (forward, backward, optimizer step) is
timed (CUDA synchronized) with the peak of torch.cuda.max_memory_allocated / reserved over the step, the
process's peak host RSS, and the offloader's host pool. The first out-of-memory error ends the sweep
(recorded, not raised); so does ``--time-budget-s`` (the next length is predicted to take >= 2x the
last). ``--memory-cap-gib`` caps the device memory through torch.cuda.set_per_process_memory_fraction.
Writes DIR/long_context.json (after every length, so a run cut short keeps what it measured): rows of
bench/schema.py (op ``long_context``, case the training, shape the model and length, impl the variant,
``peak_mib`` torch's peak allocated on CUDA or the host's max RSS on the CPU; reserved memory, host RSS
and the offloader's pool in ``extra``), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import resource
import time

import torch

from bench.e2e import common

SIZES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # in_features multiples of 64 (bitsandbytes' blocksize) so --qlora works on CPU too
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False, rope_theta=10000.0),
}
DEFAULT_LENGTHS = {"8b": [65536, 131072, 262144, 524288], "1b": [131072, 262144, 524288, 1048576],
                   "tiny": [64, 128]}
VARIANTS = ("long", "defaults", "unpatched")
GIB = 1 << 30


def build_model(size: str, layers: int | None, max_len: int, device: torch.device, qlora: bool):
    import transformers

    shape = dict(SIZES[size])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = transformers.LlamaConfig(max_position_embeddings=max(max_len, 8192), **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    # Built on the device in bf16: an 8B model initialised on the CPU in fp32 takes minutes and 32 GB.
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
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


def prepare(model, variant: str, tiled: str = "auto"):
    """Patch (or not) and turn checkpointing on; returns the report text."""
    import fastkern

    if variant == "long":
        return str(fastkern.patch_model(model, checkpointing="offload", tiled_mlp=TILED[tiled]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant == "defaults":
        return str(fastkern.patch_model(model, tiled_mlp=TILED[tiled]))
    return "unpatched"


def _host_rss_gib() -> float:
    # ru_maxrss: the process's peak resident set (KiB on Linux): pinned host buffers count once touched.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def _offload_pool_gib(model) -> float | None:
    from fastkern.patching.checkpointing import model_offloader

    offloader = model_offloader(model)
    return None if offloader is None else offloader.pool.bytes_held / GIB


def _free(model, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    from fastkern.patching.checkpointing import model_offloader

    offloader = model_offloader(model)
    if offloader is not None:
        offloader.empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def train_step(model, optimizer, seq_len: int, vocab: int, device: torch.device) -> float:
    """One forward + backward + optimizer step on a [1, seq_len] row of random ids; returns the loss."""
    g = torch.Generator(device="cpu").manual_seed(seq_len)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g).to(device)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    del loss, ids
    return value


def measure(model, optimizer, seq_len: int, vocab: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    loss = train_step(model, optimizer, seq_len, vocab, device)
    if cuda:
        torch.cuda.synchronize(device)
    step_s = time.perf_counter() - start
    row = dict(seq_len=seq_len, ok=math.isfinite(loss), loss=loss, step_s=round(step_s, 4),
               tokens_per_s=round(seq_len / step_s, 1), host_peak_rss_gib=round(_host_rss_gib(), 3),
               offload_pool_gib=_offload_pool_gib(model))
    if cuda:
        row.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 3),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 3),
                   before_step_gib=round(base / GIB, 3))
    return row


def run(args, save=lambda result: None) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lengths = sorted(args.lengths or DEFAULT_LENGTHS[args.size])
    if args.memory_cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * GIB / total), device)
    model = build_model(args.size, args.layers, lengths[-1], device, args.qlora)
    model = add_lora(model, args.lora_r)
    report = prepare(model, args.variant, args.tiled_mlp)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    vocab = model.config.vocab_size
    out = dict(size=args.size, layers=model.config.num_hidden_layers, qlora=args.qlora, lora_r=args.lora_r,
               variant=args.variant, tiled_mlp=args.tiled_mlp, device=torch.cuda.get_device_name(device) if device.type == "cuda" else
               platform.processor() or "cpu", device_type=device.type, torch=torch.__version__, memory_cap_gib=args.memory_cap_gib,
               trainable_params=sum(p.numel() for p in trainable), report=report, results=[])
    started = time.perf_counter()
    try:
        train_step(model, optimizer, min(lengths[0], args.warmup_len), vocab, device)
    except Exception as exc:  # noqa: BLE001 - recorded, the sweep cannot start
        out["results"].append(dict(seq_len=min(lengths[0], args.warmup_len), ok=False, error=f"warm-up: {exc!r}"[:500]))
        return out
    _free(model, optimizer)
    last_s = 0.0
    for seq_len in lengths:
        if args.time_budget_s and time.perf_counter() - started + 2 * last_s > args.time_budget_s:
            out["results"].append(dict(seq_len=seq_len, ok=False, error="skipped: time budget"))
            break
        try:
            row = measure(model, optimizer, seq_len, vocab, device)
        except Exception as exc:  # noqa: BLE001 - the first failure ends the sweep, recorded
            oom = is_oom(exc)
            out["results"].append(dict(seq_len=seq_len, ok=False, error="out of memory" if oom else repr(exc)[:500]))
            _free(model, optimizer)
            break
        out["results"].append(row)
        save(out)  # a sweep cut short by the device's time limit still leaves the lengths done
        last_s = row["step_s"]
        _free(model, optimizer)
        if not row["ok"]:
            break
    return out


def table(result: dict) -> str:
    lines = [f"{result['size']} x{result['layers']} layers, {'QLoRA NF4' if result['qlora'] else 'LoRA bf16'} "
             f"r{result['lora_r']}, variant {result['variant']}, {result['device']}",
             "| tokens | ok | step s | tokens/s | peak alloc GiB | peak reserved GiB | host RSS GiB | loss |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        if not r.get("error"):
            lines.append(f"| {r['seq_len']} | {r['ok']} | {r['step_s']} | {r['tokens_per_s']} | "
                         f"{r.get('peak_allocated_gib', '-')} | {r.get('peak_reserved_gib', '-')} | "
                         f"{r['host_peak_rss_gib']} | {r['loss']:.4f} |")
        else:
            lines.append(f"| {r['seq_len']} | False | {r['error']} | | | | | |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="8b")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--qlora", action="store_true", help="NF4 (double quant) decoder linears via bitsandbytes")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--variant", choices=VARIANTS, default="long")
    p.add_argument("--tiled-mlp", choices=sorted(TILED), default="auto", help="patch_model's tiled_mlp option")
    p.add_argument("--memory-cap-gib", type=float, default=None)
    p.add_argument("--time-budget-s", type=float, default=540.0)
    p.add_argument("--warmup-len", type=int, default=2048)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=".")
    p.add_argument("--tiny", action="store_true", help="CPU, the tiny shape (--size tiny --device cpu)")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.device = "tiny", "cpu"
    return args


def schema_rows(result: dict) -> list[dict]:
    """The sweep's rows in bench/schema.py's schema."""
    cuda = result["device_type"] == "cuda"
    env = common.environment(torch.device(result["device_type"]))
    case = f"{'QLoRA NF4' if result['qlora'] else 'LoRA bf16'} r{result['lora_r']} train step"
    impl = f"{result['variant']} (tiled_mlp {result['tiled_mlp']})"
    common_extra = dict(memory_cap_gib=result["memory_cap_gib"], trainable_params=result["trainable_params"],
                        report=result["report"])
    rows = []
    for r in result["results"]:
        shape = f"{result['size']} x{result['layers']} layers T{r['seq_len']}"
        if r.get("error"):
            rows.append(common.schema.make_row(env, op="long_context", case=case, shape=shape, dtype="bfloat16",
                                               impl=impl, error=r["error"], **common_extra))
            continue
        peak = r.get("peak_allocated_gib") if cuda else r["host_peak_rss_gib"]
        extra = {k: v for k, v in r.items() if k not in ("seq_len", "step_s", "tokens_per_s", "loss", "error")}
        rows.append(common.schema.make_row(
            env, op="long_context", case=case, shape=shape, dtype="bfloat16", impl=impl, ms=r["step_s"] * 1e3,
            throughput=r["tokens_per_s"], throughput_unit="tokens/s", loss=r["loss"],
            peak_mib=None if peak is None else peak * 1024, peak_scope="total" if cuda else "host",
            error=None if r["ok"] else "loss not finite", **extra, **common_extra))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            print("--qlora needs bitsandbytes; not installed")
            return 2
    os.makedirs(args.out, exist_ok=True)

    def save(result):
        return common.write(args.out, "long_context", schema_rows(result))

    result = run(args, save)
    path = save(result)
    print(table(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
