"""Offloaded checkpointing on a Llama-1B-shape model: step time, peak memory, longest trainable context.

    python -m bench.e2e.offload --out DIR [--steps 6] [--cap-gib 16] [--budget-s 170]
    python -m bench.e2e.offload --tiny --out DIR     # CPU: tiny shape, B2 x T64, steps 1-2 only (tests run this)

Model: hidden 2048, intermediate 8192, 16 layers, 32/8 heads, vocab 128256, random init, bf16, SDPA;
LoRA r16 on all linear layers when peft imports (else full fine-tuning). Variants, one model
reconfigured between them: no checkpointing, plain non-reentrant checkpointing, transformers'
offload=True (save_on_cpu on the compute stream), TRL's activation-offloading context over plain
checkpointing, and fastkern.patch_model(checkpointing="offload").

1. Correctness: one batch, same weights, every variant's loss and trainable gradients against plain
   checkpointing under SDPA's math backend (deterministic; see correctness()); relative error norm
   must stay below TOLERANCE; a wrong variant is not timed.
2. B2 x T4096 training steps (forward with labels through transformers' loss, backward, AdamW step):
   median of synchronized per-step wall times after warm-up, and peak allocated memory.
3. Longest context at batch 1 under a per-process cap of --cap-gib (so that the limit is reached in
   seconds rather than minutes of quadratic attention): the loss is computed in checkpointed 1024-token
   chunks (same for every variant) so that logits do not decide the limit; T doubles from 8192 until
   out of memory, then bisects to 2048 tokens (CUDA only).

Writes DIR/offload.json: one row of bench/schema.py per variant (op ``offload``, case ``train step``,
``peak_mib`` torch's peak allocated, model included; the peak above the step-start baseline, the saving
against plain checkpointing, the check's error, the offloader's counters and the longest context in
``extra``; a variant that is unavailable or wrong is a row with its ``error``).
"""

import argparse
import contextlib
import gc
import inspect
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastkern
from bench.e2e import common
from fastkern.patching.checkpointing import model_offloader
from fastkern.patching.options import OPTIONS

SHAPES = {"1b": dict(hidden=2048, inter=8192, layers=16, heads=32, kv_heads=8, vocab=128256),
          "tiny": dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2, vocab=256)}
CHUNK = 1024  # tokens per lm_head chunk in the long-context loss
LONG_START = 8192
GIB = 2**30
# Relative error allowed vs plain checkpointing under deterministic kernels (copies are exact).
TOLERANCE = 5e-3
# Every other patch_model option off: this bench measures checkpointing alone.
CHECKPOINTING_ONLY = {o.name: None for o in OPTIONS} | {"checkpointing": "offload"}


def build(lora_rank, shape, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                         max_position_embeddings=262144, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    hf.config.use_cache = False
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return hf, hf, "full fine-tuning (peft not installed)"
    model = get_peft_model(hf, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear",
                                          lora_dropout=0.0))
    return model, hf, f"LoRA r{lora_rank} all-linear (peft)"


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fn(*args, **kwargs)


def enable_gc(hf, offload=False):
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):
        _quiet(hf.activation_checkpointing_enable, activation_checkpointing_kwargs=kwargs, offload=offload)
    elif offload:
        _quiet(hf.gradient_checkpointing_enable, gradient_checkpointing_kwargs=kwargs, offload=True)
    else:
        _quiet(hf.gradient_checkpointing_enable, gradient_checkpointing_kwargs=kwargs)


def disable_gc(hf):
    _quiet(getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)


def transformers_has_offload(hf):
    method = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable
    return "offload" in inspect.signature(method).parameters


class Variant:
    """Configures the model on enter, restores it on exit; ``context()`` wraps each forward+backward."""

    def __init__(self, name, model, hf):
        self.name, self.model, self.hf = name, model, hf
        self.available, self.why = True, ""
        if name == "transformers offload=True" and not transformers_has_offload(hf):
            self.available, self.why = False, "not in this transformers"
        if name == "TRL activation offloading":
            try:
                from trl.models import get_act_offloading_ctx_manager  # noqa: F401
            except Exception as exc:
                self.available, self.why = False, f"not installed ({type(exc).__name__})"

    def __enter__(self):
        if self.name in ("plain checkpointing", "TRL activation offloading"):
            enable_gc(self.hf)
        elif self.name == "transformers offload=True":
            enable_gc(self.hf, offload=True)
        elif self.name == "fastkern offload":
            fastkern.patch_model(self.model, **CHECKPOINTING_ONLY)
        return self

    def __exit__(self, *exc):
        if self.name == "fastkern offload":
            fastkern.unpatch_model(self.model)
        elif self.name != "no checkpointing":
            disable_gc(self.hf)
        return False

    def context(self):
        if self.name == "TRL activation offloading":
            from trl.models import get_act_offloading_ctx_manager

            return get_act_offloading_ctx_manager(self.model)
        return contextlib.nullcontext()


VARIANTS = ["no checkpointing", "plain checkpointing", "transformers offload=True", "TRL activation offloading",
            "fastkern offload"]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def hf_loss_step(model, ids, ctx):
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach()


def chunked_loss_step(model, hf, ids, ctx, chunk=CHUNK):
    """Backbone, then cross-entropy over checkpointed chunks of the lm_head (logits never whole)."""
    with ctx:
        hidden = hf.model(input_ids=ids).last_hidden_state
        head = hf.get_output_embeddings()
        hidden, labels = hidden[:, :-1], ids[:, 1:]
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, labels.shape[1], chunk):
            h, y = hidden[:, s:s + chunk], labels[:, s:s + chunk]
            total = total + checkpoint(
                lambda h, y: F.cross_entropy(head(h).float().flatten(0, 1), y.flatten(), reduction="sum"),
                h, y, use_reentrant=False)
        loss = total / labels.numel()
        loss.backward()
    return loss.detach()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def correctness(model, hf, variants, ids):
    """Each variant's loss and trainable gradients vs plain checkpointing, relative error norm.

    Run under SDPA's math backend so that the comparison is between deterministic kernels: on an H100
    under the default (flash) backend every variant, no checkpointing included, differed from a
    plain-checkpointing run by 1.3e-2 in bf16 gradients of this random-init model (flash_noise()
    measures plain against itself). Offloading only copies bytes and recomputes
    with the same kernels, so every checkpointing variant must reproduce plain checkpointing. No
    checkpointing keeps every layer's attention probabilities under the math backend, so it is
    checked on the first 1024 tokens. Plain checkpointing is also compared with its own earlier run.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    plain = next(v for v in variants if v.name == "plain checkpointing")

    def run(v, batch):
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(SDPBackend.MATH), v:
            return _loss_and_grads(model, batch, v)

    refs, out = {}, {}
    for v in variants:
        batch = ids[:, :1024] if v.name == "no checkpointing" else ids
        try:
            if batch.shape not in refs:
                refs[batch.shape] = run(plain, batch)
            result = run(v, batch)
        except Exception as exc:  # a peer failing on this model is a result, not a crash of the bench
            v.available, v.why = False, f"failed: {type(exc).__name__}: {str(exc)[:120]}"
            continue
        ref = refs[batch.shape]
        out[v.name] = max(rel_err(result[0], ref[0]), rel_err(result[1], ref[1]))
    model.zero_grad(set_to_none=True)
    return out


def flash_noise(model, plain, ids):
    """Relative error between two plain-checkpointing runs on the default SDPA backend."""
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with plain:
            runs.append(_loss_and_grads(model, ids, plain))
    model.zero_grad(set_to_none=True)
    return max(rel_err(runs[1][0], runs[0][0]), rel_err(runs[1][1], runs[0][1]))


def _loss_and_grads(model, ids, v):
    loss = hf_loss_step(model, ids, v.context())
    return loss, torch.cat([p.grad.float().flatten() for p in trainable(model) if p.grad is not None])


def time_steps(model, v, ids, opt, steps):
    """Median step seconds, the peak (common.peak), the allocation at the step start (CUDA), the
    offloader's counters and the last loss."""
    device, cuda = ids.device, ids.device.type == "cuda"
    times, base = [], 0
    with v:
        for i in range(steps + 2):
            if i == 2 and cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            common.sync(device)
            t0 = time.perf_counter()
            loss = hf_loss_step(model, ids, v.context())
            opt.step()
            opt.zero_grad(set_to_none=True)
            common.sync(device)
            times.append(time.perf_counter() - t0)
        extra = {}
        offloader = model_offloader(model)
        if offloader is not None:
            extra = dict(host_bytes=offloader.pool.bytes_held, **vars(offloader.stats))
    return statistics.median(times[2:]), common.peak(device), base, extra, loss.item()


def fits(model, hf, v, length, vocab):
    ids = torch.randint(0, vocab, (1, length), device="cuda")
    ok = True
    try:
        with v:
            chunked_loss_step(model, hf, ids, v.context())
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        ok = False
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return ok


def longest_context(model, hf, v, deadline, vocab):
    good, bad, length = 0, None, LONG_START
    while bad is None:
        if time.perf_counter() > deadline:
            return good, "time budget hit"
        if fits(model, hf, v, length, vocab):
            good, length = length, length * 2
        else:
            bad = length
    while bad - good > LONG_START // 4:
        if time.perf_counter() > deadline:
            return good, "time budget hit"
        mid = (good + bad) // 2 // (LONG_START // 8) * (LONG_START // 8)
        if fits(model, hf, v, mid, vocab):
            good = mid
        else:
            bad = mid
    return good, f"OOM at {bad}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--lora", type=int, default=16)
    parser.add_argument("--cap-gib", type=float, default=16.0)
    parser.add_argument("--budget-s", type=float, default=170.0, help="stop the long-context search this long after start")
    parser.add_argument("--tiny", action="store_true", help="CPU: tiny shape, B2 x T64, 1 timed step, no search")
    args = parser.parse_args(argv)
    args.shape = "tiny" if args.tiny else "1b"
    if args.tiny:
        args.length, args.steps = 64, 1
    return args


def measure_steps(args, model, variants, errors, ids) -> list[dict]:
    """Per variant: median step time and peak memory, or why it was not timed."""
    opt = torch.optim.AdamW(trainable(model), lr=1e-5)
    cuda = ids.device.type == "cuda"
    rows = []
    for v in variants:
        row = dict(variant=v.name)
        if not v.available:
            row["error"] = v.why
        elif not errors.get(v.name, float("nan")) < TOLERANCE:
            row["error"] = f"wrong: relative error {errors.get(v.name, float('nan')):.2e} vs plain checkpointing; not timed"
        else:
            try:
                # Whatever an earlier variant (or the correctness pass) left alive would count in this
                # variant's peak: collect it first, and report the peak above the step-start baseline too.
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                step_s, peak, base, extra, loss = time_steps(model, v, ids, opt, args.steps)
            except Exception as exc:
                v.available = False
                row["error"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                print(row, flush=True)
                continue
            above = (peak["peak_mib"] - base / 2**20) / 1024 if cuda else None
            row.update(rel_err=errors[v.name], step_s=step_s, loss=loss, peak=peak, peak_above_weights_gib=above, **extra)
        rows.append(row)
        print(row, flush=True)
    plain = next((r for r in rows if r["variant"] == "plain checkpointing" and "step_s" in r), None)
    for r in rows:
        if plain and "step_s" in r:
            r["time_vs_plain"] = r["step_s"] / plain["step_s"] - 1
            r["saved_vs_plain_mib"] = plain["peak"]["peak_mib"] - r["peak"]["peak_mib"]
            if cuda:
                r["saved_above_baseline_mib"] = (plain["peak_above_weights_gib"] - r["peak_above_weights_gib"]) * 1024
                r["baseline_gib"] = r["peak"]["peak_mib"] / 1024 - r["peak_above_weights_gib"]
    return rows


def longest_contexts(args, model, hf, variants, errors, deadline) -> dict[str, dict]:
    """Longest trainable T at batch 1 under the --cap-gib cap, per variant (CUDA only)."""
    total = torch.cuda.get_device_properties(0).total_memory
    gc.collect()
    torch.cuda.empty_cache()  # the cap limits reserved memory: cached blocks from above must go first
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
    longest = {}
    # Most wanted first, in case the time budget runs out.
    order = ["plain checkpointing", "fastkern offload", "transformers offload=True", "TRL activation offloading"]
    for v in sorted(variants, key=lambda v: order.index(v.name) if v.name in order else len(order)):
        if not v.available or v.name == "no checkpointing":
            continue
        if v.name != "plain checkpointing" and not errors.get(v.name, 1.0) < TOLERANCE:
            continue
        t0 = time.perf_counter()
        length, why = longest_context(model, hf, v, deadline, SHAPES[args.shape]["vocab"])
        longest[v.name] = dict(longest_T=length, longest_stop=why, longest_search_s=time.perf_counter() - t0,
                               longest_cap_gib=args.cap_gib)
        print(v.name, longest[v.name], flush=True)
    torch.cuda.set_per_process_memory_fraction(1.0)
    return longest


def schema_rows(args, rows, longest, noise, training, device) -> list[dict]:
    env = common.environment(device)
    out = []
    for r in rows:
        extra = {k: v for k, v in r.items() if k not in ("variant", "step_s", "loss", "peak", "error")}
        extra.update(longest.get(r["variant"], {}), training=training, flash_noise=noise)
        out.append(common.schema.make_row(
            env, op="offload", case="train step", shape=f"llama-{args.shape} B{args.batch} T{args.length}",
            dtype="bfloat16" if device.type == "cuda" else "float32", impl=r["variant"],
            ms=r["step_s"] * 1e3 if "step_s" in r else None, loss=r.get("loss"), error=r.get("error"),
            throughput=args.batch * args.length / r["step_s"] if "step_s" in r else None, throughput_unit="tokens/s",
            **r.get("peak", {}), **extra))
    return out


def print_tables(args, rows, longest, noise, training, device) -> None:
    hidden, layers = SHAPES[args.shape]["hidden"], SHAPES[args.shape]["layers"]
    target_mib = (layers - 2) * args.length * hidden * 2 / 2**20
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (a smoke test, not a measurement)"
    print(f"\nLlama-{args.shape} shape, {training}, B{args.batch} x T{args.length}; {name}")
    print(f"one layer input = {args.batch * args.length * hidden * 2 / 2**20:.0f} MiB; memory target (layers-2) x T x "
          f"hidden x 2 B = {target_mib:.0f} MiB (x batch {args.batch}: {target_mib * args.batch:.0f} MiB); time target +2 %")
    print(f"check: math-SDPA rel err vs plain checkpointing (no checkpointing: first 1024 tokens); plain vs "
          f"plain on the default SDPA backend: {noise:.1e}\n")
    print("| variant | step (s) | vs plain | peak (GiB) | step-start baseline (GiB) | saved vs plain (MiB): "
          "absolute / above baseline | check |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "step_s" not in r:
            print(f"| {r['variant']} | | | | | | {r['error']} |")
            continue
        vs = f"{r['time_vs_plain']:+.1%}" if "time_vs_plain" in r else ""
        saved = (f"{r['saved_vs_plain_mib']:.0f} / {r.get('saved_above_baseline_mib', float('nan')):.0f}"
                 if "saved_vs_plain_mib" in r else "")
        base = f"{r['baseline_gib']:.3f}" if "baseline_gib" in r else "-"
        print(f"| {r['variant']} | {r['step_s']:.4f} | {vs} | {r['peak']['peak_mib'] / 1024:.2f} ({r['peak']['peak_scope']}) | "
              f"{base} | {saved} | rel err {r['rel_err']:.1e} |")
    if longest:
        print(f"\nLongest T at batch 1 (cap {args.cap_gib} GiB, chunked loss, {LONG_START // 4}-token resolution):\n")
        print("| variant | longest T | stopped by | search (s) |")
        print("|---|---|---|---|")
        for name, r in longest.items():
            print(f"| {name} | {r['longest_T']} | {r['longest_stop']} | {r['longest_search_s']:.0f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device = common.device(args.tiny)
    model, hf, training = build(args.lora, SHAPES[args.shape], device)
    variants = [Variant(name, model, hf) for name in VARIANTS]
    runnable = [v for v in variants if v.available]
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape]["vocab"], (args.batch, args.length), device=device, generator=g)
    errors = correctness(model, hf, runnable, ids)
    noise = flash_noise(model, next(v for v in variants if v.name == "plain checkpointing"), ids)
    print(f"correctness (math SDPA, rel err vs plain checkpointing): {errors}; default-backend run-to-run noise {noise:.1e}")
    rows = measure_steps(args, model, variants, errors, ids)
    longest = longest_contexts(args, model, hf, variants, errors, start + args.budget_s) if device.type == "cuda" else {}
    print_tables(args, rows, longest, noise, training, device)
    print("wrote", common.write(args.out, "offload", schema_rows(args, rows, longest, noise, training, device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
