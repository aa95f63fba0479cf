"""GRPO and DPO steps in stock TRL, unpatched vs fastkern.patch_model(loss=True): peak memory and time.

    python -m bench.e2e.grpo_dpo --out DIR [--config qwen3-0.6b|tiny] [--budget-s 200] [--tasks grpo,dpo]
        [--variants "defaults;loss"] [--no-gradient-checkpointing] [--profile]
    python -m bench.e2e.grpo_dpo --tiny --out DIR     # CPU: the tiny config (the tests run this)

Model: Qwen3-0.6B shape (hidden 1024, intermediate 3072, 28 layers, 16/8 heads, head_dim 128, vocab
151936, tied embeddings), random init, bf16 weights, SDPA, LoRA r16 on all linear layers, TRL's
default gradient checkpointing (``--no-gradient-checkpointing`` turns it off). Each
variant builds its own model (same seed) and its own trainer, because fastkern must be patched in before TRL wraps the forward (``add_fused_lm_head``).

GRPO (TRL 1.16 GRPOTrainer, loss_type dapo, beta 0.04): 8 completions x 1024 tokens after a 128-token
prompt, with fixed random completion ids: generation is excluded. The timed part is what TRL runs
per optimizer step besides generation and the optimizer: the reference log-probs (no grad, adapters
disabled, ``_get_per_token_logps_and_entropies`` as in ``_generate_and_score_completions``), then
``compute_loss`` (policy log-probs + entropy + loss) and ``backward``.

DPO (TRL 1.16 DPOTrainer, sigmoid loss): one pair, 2 x (prompt 512 + completion 512) tokens; the
timed part is ``compute_loss`` (policy forward, reference forward under disable_adapter, loss) and
``backward``.

Correctness first: the patched loss and LoRA gradients are compared with the unpatched ones on the
same inputs, sharply in fp32 on a 2-layer model of the bench shape (full vocabulary, same sequence
shapes; FP32_TOLERANCE) and loosely on the bf16 bench model itself (BF16_TOLERANCE); a wrong row is
not timed.
Timing: triton.testing.do_bench (median); memory: peak allocated during one step minus what was
allocated before it (model, adapters' gradients freed as an optimizer's zero_grad would). The
``TRL kernel calls`` column counts calls into TRL's own ChunkedLogProbFunction during one step: 0
means fastkern computed every log-prob.

Variants (``--variants``, ``;``-separated): ``defaults`` is ``patch_model(model, loss=True)`` (every
default option on), ``defaults,lora,offload`` adds lora=True and checkpointing="offload" to it,
``defaults,-norm`` is the defaults with one option off (``-checkpointing``: TRL's own),
``defaults,fused-qk-norm`` / ``defaults,separate-qk-norm`` the defaults with Qwen3's q/k norms and rope
in one launch / as three (fastkern/patching/attention.py, ``FUSE_QK_NORM``, set around each of that
variant's steps); a comma
list without ``defaults`` such as ``loss`` or ``loss,mlp`` turns on exactly those options and every
other one off, to attribute a difference to one patch. ``--profile`` prints, per row, the CUDA
kernels of one step by total device time (torch.profiler), to say where a difference comes from.

Writes DIR/grpo_dpo.json: rows of bench/schema.py (op ``grpo_dpo``, case ``grpo step`` / ``dpo step``,
impl the variant, ``ms`` the step, ``peak_mib`` the peak extra memory, tokens/s over the step's tokens,
``loss``; the checks' relative errors, the TRL kernel calls and the interleaved median in ``extra``).
"""

import argparse
import gc
import os
import sys
import tempfile
import time

import torch

import fastkern
from bench.e2e import common
from fastkern.demo import build_tokenizer

CONFIGS = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
    # CPU smoke test of this script (interpreter): same code path, toy sizes.
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1031),
}
SHAPES = {  # (generations, prompt, completion) for GRPO; (prompt, completion) for DPO
    "qwen3-0.6b": dict(grpo=(8, 128, 1024), dpo=(512, 512)),
    "tiny": dict(grpo=(4, 8, 16), dpo=(8, 8)),
}
LORA_RANK = 16
OPTIONS = ("loss", "mlp", "rope", "packing", "lora", "norm")
QK_NORM_FUSION = "qk_norm_fusion"  # a variant's pseudo-option (not passed to patch_model): True / False
# fp32 check (2 layers of the bench shape, full vocabulary, same sequence shapes): relative error norm.
FP32_TOLERANCE = 1e-4
# bf16 rows, whole model: two implementations' rounding differs (2e-2 measured on the CPU smoke config);
# this only catches gross errors, the fp32 check above is the sharp one.
BF16_TOLERANCE = 1e-1


class TRLKernelCalls:
    def __enter__(self):
        from trl.kernels import ChunkedLogProbFunction as cls

        self.cls, self.count, bound = cls, 0, cls.apply

        def counting(*args):
            self.count += 1
            return bound(*args)

        cls.apply = staticmethod(counting)
        return self

    def __exit__(self, *exc):
        del self.cls.apply


def build_model(name, device, dtype, patch, layers=None, checkpointing=False):
    """patch: None (unpatched) or the patch_model options."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = dict(CONFIGS[name], **({} if layers is None else {"num_hidden_layers": layers}))
    config = Qwen3Config(max_position_embeddings=4096, tie_word_embeddings=True, **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear",
                                             lora_dropout=0.0, init_lora_weights=False))
    if checkpointing:  # what TRL's configs default to in training
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    options = None if patch is None else {k: v for k, v in patch.items() if k != QK_NORM_FUSION}
    report = fastkern.patch_model(model, **options) if options is not None else None
    return model, report


def switched(step, patch):
    """The step as the variant runs it: with the q/k-norm fusion set as the variant asks (the switch is
    module-wide, so it is set around each of that variant's steps only)."""
    fuse = (patch or {}).get(QK_NORM_FUSION)
    if fuse is None:
        return step
    from fastkern.patching import attention

    def switched_step():
        before, attention.FUSE_QK_NORM = attention.FUSE_QK_NORM, fuse
        try:
            return step()
        finally:
            attention.FUSE_QK_NORM = before

    return switched_step


def make_grpo(name, device, dtype, patch, out_dir, layers=None, checkpointing=False):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    gens, prompt_len, completion_len = SHAPES[name]["grpo"]
    model, report = build_model(name, device, dtype, patch, layers, checkpointing)
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=gens, num_generations=gens,
                      max_completion_length=completion_len, beta=0.04, loss_type="dapo", bf16=dtype == torch.bfloat16,
                      report_to="none", save_strategy="no", use_cpu=device == "cpu", disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["1 2 3"] * gens}),
                          processing_class=build_tokenizer())
    trainer.current_gradient_accumulation_steps = 1  # set by train(); compute_loss reads it
    g = torch.Generator().manual_seed(2)
    vocab = CONFIGS[name]["vocab_size"]
    completion_mask = torch.ones(gens, completion_len, dtype=torch.long)
    completion_mask[1::2, completion_len * 3 // 4:] = 0  # half the completions end early (padding)
    inputs = dict(
        prompt_ids=torch.randint(0, vocab, (gens, prompt_len), generator=g),
        prompt_mask=torch.ones(gens, prompt_len, dtype=torch.long),
        completion_ids=torch.randint(0, vocab, (gens, completion_len), generator=g),
        completion_mask=completion_mask,
        advantages=torch.randn(gens, generator=g),
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["num_items_in_batch"] = completion_mask.sum().to(device)

    def step():
        from trl.trainer.utils import use_adapter

        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        with torch.no_grad(), use_adapter(trainer.model, adapter_name=None):
            ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, completion_len,
                                                                   batch_size=gens)
        loss = trainer.compute_loss(trainer.model, dict(inputs, ref_per_token_logps=ref))
        loss.backward()
        return loss

    return trainer, switched(step, patch), report


def make_dpo(name, device, dtype, patch, out_dir, layers=None, checkpointing=False):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    prompt_len, completion_len = SHAPES[name]["dpo"]
    model, report = build_model(name, device, dtype, patch, layers, checkpointing)
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=1, beta=0.1, loss_type=["sigmoid"],
                     max_length=prompt_len + completion_len, bf16=dtype == torch.bfloat16, report_to="none",
                     save_strategy="no", use_cpu=device == "cpu", disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, processing_class=build_tokenizer(),
                         train_dataset=Dataset.from_dict({"prompt": ["1 2"], "chosen": [" 3"], "rejected": [" 4"]}))
    g = torch.Generator().manual_seed(3)
    vocab = CONFIGS[name]["vocab_size"]
    total = prompt_len + completion_len
    completion_mask = torch.zeros(2, total, dtype=torch.long)
    completion_mask[:, prompt_len:] = 1
    inputs = dict(input_ids=torch.randint(0, vocab, (2, total), generator=g),
                  attention_mask=torch.ones(2, total, dtype=torch.long), completion_mask=completion_mask)
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def step():
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        return loss

    return trainer, switched(step, patch), report


def lora_grads(model):
    return torch.cat([p.grad.float().flatten().cpu() for n, p in model.named_parameters() if p.requires_grad])


def zero_grads(model):
    for p in model.parameters():
        p.grad = None


def fp32_check(task, name, device, options):
    """Unpatched vs patched loss and LoRA gradients in fp32 on a 2-layer model of the bench shape."""
    make = make_grpo if task == "grpo" else make_dpo
    results = []
    for patch in (None, options):
        with tempfile.TemporaryDirectory() as out_dir:
            trainer, step, _ = make(name, device, torch.float32, patch, out_dir, layers=2)
            trainer.model.train()
            zero_grads(trainer.model)
            loss = step()
            results.append((loss.item(), lora_grads(trainer.model)))
        del trainer, step
        gc.collect()
    (lu, gu), (lp, gp) = results
    return abs(lp - lu) / max(abs(lu), 1e-6), ((gp - gu).norm() / gu.norm()).item()


def variant_options(spec: str) -> dict:
    """'defaults' -> patch_model(loss=True); 'defaults,lora' adds options to that; 'defaults,-lora' turns
    one default off (to attribute a difference to it; '-checkpointing' leaves TRL's own checkpointing);
    'loss,mlp' turns on exactly those options and the others off. 'offload' stands for
    checkpointing="offload"."""
    items = {o.strip() for o in spec.split(",") if o.strip()}
    off = {o[1:] for o in items if o.startswith("-")}
    on = items - {"-" + o for o in off}
    pseudo = {"defaults", "offload", "fused-qk-norm", "separate-qk-norm"}
    unknown = (on - set(OPTIONS) - pseudo) | (off - set(OPTIONS) - {"checkpointing"})
    if unknown or (off and "defaults" not in on):
        raise SystemExit(f"bad --variants item(s) {sorted(unknown) or sorted(off)}: known {OPTIONS}, offload, "
                         "fused-qk-norm, separate-qk-norm, defaults, and -<option> (with defaults)")
    options = dict(loss=True) if "defaults" in on else {o: o in on for o in OPTIONS}
    options.update({o: True for o in on & set(OPTIONS)})
    if "offload" in on:
        options["checkpointing"] = "offload"
    if "fused-qk-norm" in on or "separate-qk-norm" in on:
        options[QK_NORM_FUSION] = "fused-qk-norm" in on
    options.update({o: (None if o == "checkpointing" else False) for o in off})
    return options


def variant_label(options) -> str:
    if options is None:
        return "TRL 1.16 (unpatched)"
    if options == dict(loss=True):
        return "fastkern.patch_model(loss=True)"
    return "patch_model(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")"


def top_kernels(step, rows: int = 12) -> str:
    """CUDA kernels of one step by total device time, as a small table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    return events.table(sort_by=key, row_limit=rows, max_name_column_width=70)


def measure(task, name, device, dtype, patch, reference, do_bench, checkpointing=False, profile=False,
            memory_peak=False):
    make = make_grpo if task == "grpo" else make_dpo
    label = variant_label(patch)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer, step, report = make(name, device, dtype, patch, out_dir, checkpointing=checkpointing)
        model = trainer.model
        model.train()
        zero_grads(model)
        with TRLKernelCalls() as calls:
            loss = step()
        row = dict(task=task, variant=label, loss=loss.item(), trl_kernel_calls=calls.count,
                   report=str(report) if report is not None else "")
        grads = lora_grads(model)
        if reference is not None:
            loss_err = abs(row["loss"] - reference["loss"]) / max(abs(reference["loss"]), 1e-6)
            grad_err = ((grads - reference["grads"]).norm() / reference["grads"].norm()).item()
            row.update(loss_rel_err=loss_err, grad_rel_err=grad_err)
            if not (loss_err < BF16_TOLERANCE and grad_err < BF16_TOLERANCE):
                row["error"] = f"mismatch vs unpatched: loss {loss_err:.2e}, LoRA grads {grad_err:.2e}; not timed"
                return row, None
        if device == "cuda":
            zero_grads(model)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
            if memory_peak:  # what is alive at the peak, by allocation site (bench/memory_peak.py)
                from bench.memory_peak import peak_report, record

                zero_grads(model)
                with record() as trace:
                    step()
                row["peak_sites"] = peak_report(trace.events)
                print(f"--- {task} / {label}: {row['peak_sites']}", flush=True)

            def timed():
                zero_grads(model)
                step()

            row["ms"] = do_bench(timed, warmup=200, rep=4000, return_mode="median")
            if profile:
                print(f"--- {task} / {label}: CUDA kernels of one step\n{top_kernels(timed)}", flush=True)
        else:
            t0 = time.perf_counter()
            zero_grads(model)
            step()
            row["ms"] = (time.perf_counter() - t0) * 1e3
        result = dict(loss=row["loss"], grads=grads)
    del trainer, step, model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row, result


def interleaved_ms(task, name, device, dtype, variants, checkpointing, rounds) -> dict[str, float]:
    """Median step time of every variant, timed round-robin (A B C A B C ...) with all trainers alive.

    A step of this size is host-bound on the H100 machine (about 400 ms of GPU work in a 550-700 ms
    step), and the host's speed drifts between and within runs (the same unpatched GRPO step measured
    546 and 711 ms in two runs): timing variants one after another confounds that drift with the patch.
    """
    make = make_grpo if task == "grpo" else make_dpo
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    live, times = [], {}
    with tempfile.TemporaryDirectory() as out_dir:
        for patch in variants:
            trainer, step, _ = make(name, device, dtype, patch, out_dir, checkpointing=checkpointing)
            trainer.model.train()
            live.append((variant_label(patch), trainer, step))
        for r in range(rounds + 1):  # round 0 warms up
            for label, trainer, step in live:
                zero_grads(trainer.model)
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                if r:
                    times.setdefault(label, []).append((time.perf_counter() - t0) * 1e3)
    del live
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {label: sorted(ts)[len(ts) // 2] for label, ts in times.items()}


def schema_rows(rows: list[dict], name: str, dtype, device) -> list[dict]:
    """The bench's rows in bench/schema.py's schema."""
    env = common.environment(device)
    gens, p, c = SHAPES[name]["grpo"]
    dp, dc = SHAPES[name]["dpo"]
    shapes = dict(grpo=(f"{name} G{gens} P{p} C{c}", gens * (p + c)), dpo=(f"{name} 2x(P{dp} C{dc})", 2 * (dp + dc)))
    out = []
    for r in rows:
        shape, tokens = shapes[r["task"]]
        ms = r.get("ms") if "error" not in r else None
        extra = {k: v for k, v in r.items() if k not in ("task", "variant", "ms", "loss", "error", "peak_extra_gib")}
        peak = r.get("peak_extra_gib")
        out.append(common.schema.make_row(
            env, op="grpo_dpo", case=f"{r['task']} step", shape=shape, dtype=str(dtype).removeprefix("torch."),
            impl=r["variant"], ms=ms, throughput=tokens / ms * 1e3 if ms else None, throughput_unit="tokens/s",
            peak_mib=None if peak is None else peak * 1024, peak_scope="extra", loss=r.get("loss"),
            error=r.get("error"), **extra))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU, the tiny config (a smoke test, not a measurement)")
    parser.add_argument("--config", choices=list(CONFIGS), default=None,
                        help="default: qwen3-0.6b on CUDA, tiny on CPU (a smoke test, not a measurement)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new rows after this")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="no checkpointing on the policy (default: non-reentrant, TRL's training default)")
    parser.add_argument("--tasks", default="grpo,dpo")
    parser.add_argument("--variants", default="defaults", help="';'-separated, see the module docstring")
    parser.add_argument("--profile", action="store_true", help="print each row's top CUDA kernels")
    parser.add_argument("--memory-peak", action="store_true",
                        help="record one step's allocator history and print what is alive at its peak (on the H200, "
                             "patched rows with lora=True that followed a recorded row in the same process failed with "
                             "a SystemError in Function.apply; not understood, docs/benchmarks.md: record one variant "
                             "per process if that happens)")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="also time all variants round-robin for ROUNDS rounds (see interleaved_ms)")
    args = parser.parse_args(argv)
    cuda = common.device(args.tiny).type == "cuda"
    device = "cuda" if cuda else "cpu"
    name = "tiny" if args.tiny else args.config or ("qwen3-0.6b" if cuda else "tiny")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        from triton.testing import do_bench
    else:
        do_bench = None
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    rows = []
    variants = [None] + [variant_options(v.strip()) for v in args.variants.split(";") if v.strip()]
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        reference = None
        for patch in variants:
            if time.perf_counter() - start > args.budget_s:
                rows.append(dict(task=task, variant=variant_label(patch), error="time budget spent"))
                continue
            check = {}
            try:
                if patch is not None:
                    loss_err, grad_err = fp32_check(task, name, device, patch)
                    check = dict(fp32_loss_rel_err=loss_err, fp32_grad_rel_err=grad_err)
                    print(f"{task} / {variant_label(patch)}: fp32 check (2 layers): loss {loss_err:.1e}, LoRA grads "
                          f"{grad_err:.1e}", flush=True)
                    if not (loss_err < FP32_TOLERANCE and grad_err < FP32_TOLERANCE):
                        raise RuntimeError(f"fp32 check failed: loss {loss_err:.1e}, grads {grad_err:.1e}; not timed")
                row, result = measure(task, name, device, dtype, patch, reference, do_bench,
                                      args.gradient_checkpointing, args.profile, args.memory_peak)
                row.update(check)
            except Exception as exc:  # one failing variant must not lose the others' numbers
                row, result = dict(task=task, variant=variant_label(patch),
                                   error=f"{type(exc).__name__}: {exc}"), None
            if patch is None:
                reference = result
            rows.append(row)
            print({k: v for k, v in row.items() if k != "report"}, flush=True)
        if args.interleave:
            ok = [r["variant"] for r in rows if r["task"] == task and "error" not in r]
            timed = interleaved_ms(task, name, device, dtype, [v for v in variants if variant_label(v) in ok],
                                   args.gradient_checkpointing, args.interleave)
            for r in rows:
                if r["task"] == task and r["variant"] in timed:
                    r["ms_interleaved"] = timed[r["variant"]]
            print(f"{task}: interleaved medians over {args.interleave} rounds: {timed}", flush=True)
    gens, p, c = SHAPES[name]["grpo"]
    dp, dc = SHAPES[name]["dpo"]
    print(f"\n{torch.cuda.get_device_name() if cuda else 'CPU (smoke test, not a measurement)'}; {name}, LoRA r"
          f"{LORA_RANK}, {dtype}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; GRPO: {gens} x ({p} prompt + {c} completion), ref log-probs + compute_loss + "
          f"backward; DPO: 2 x ({dp} + {dc}), compute_loss (policy + reference) + backward\n")
    print("| task | variant | time (median) | interleaved median | peak extra memory | loss | rel. err loss / LoRA grads "
          "| TRL kernel calls |")
    print("|---|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        if "error" in r:
            print(f"| {r['task']} | {r['variant']} | {r['error']} | | | | | |")
            continue
        ref = base.setdefault(r["task"], r)
        ratio = "" if ref is r else f" ({r['ms'] / ref['ms']:.2f}x)"
        mem = f"{r['peak_extra_gib']:.2f} GiB" if "peak_extra_gib" in r else "n/a (CPU)"
        if ref is not r and "peak_extra_gib" in r:
            mem += f" ({r['peak_extra_gib'] / ref['peak_extra_gib']:.2f}x)"
        errs = "reference"
        if "loss_rel_err" in r:
            errs = (f"bf16 {r['loss_rel_err']:.1e} / {r['grad_rel_err']:.1e}; fp32 {r['fp32_loss_rel_err']:.1e} / "
                    f"{r['fp32_grad_rel_err']:.1e}")
        inter = "-"
        if "ms_interleaved" in r:
            inter = f"{r['ms_interleaved']:.1f} ms"
            if ref is not r and "ms_interleaved" in ref:
                inter += f" ({r['ms_interleaved'] / ref['ms_interleaved']:.2f}x)"
        print(f"| {r['task']} | {r['variant']} | {r['ms']:.1f} ms{ratio} | {inter} | {mem} | {r['loss']:.4f} | {errs} | "
              f"{r['trl_kernel_calls']} |")
    patched_report = next((r["report"] for r in rows if r.get("report")), "")
    print("\n" + patched_report)
    for r in rows:
        r["gradient_checkpointing"] = args.gradient_checkpointing
    print("wrote", common.write(args.out, "grpo_dpo", schema_rows(rows, name, dtype, torch.device(device))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
