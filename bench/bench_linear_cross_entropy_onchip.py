"""Linear cross-entropy fwd+bwd: fastkern impl="chunked" vs impl="onchip" vs Liger vs CCE, time and peak memory.

    python3 bench/bench_linear_cross_entropy_onchip.py --out DIR [--quick]

Rows (bf16, H=4096, no ignored labels): N 8192 and 32768 at V=128256, N 8192 at V=151936 (Qwen) and
262144 (Gemma 3), each with the lm_head trainable and frozen; then log-probs + entropy (GRPO) at
N8192 V128256 trainable and frozen: fastkern chunked vs onchip vs TRL 1.16's ChunkedLogProbFunction.
Each implementation is first checked against fastkern's chunked path (loss within 1e-3, gradients
within 2e-2 relative norm) and only timed if it agrees. Peers that are not importable print a line
and are skipped. Time: triton.testing.do_bench median of full fwd+bwd steps; peak = max allocated
during one step minus what was held before it (so it includes the returned gradients). The on-chip
kernels autotune on their first call per (V, H, gradient set): the check step absorbs that cost.
Prints a markdown table and writes DIR/bench_linear_cross_entropy_onchip.json. Budget: ~4 minutes
on an H200 (--quick: the V128256 rows only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

import fastkern

H = 4096
GIB = 2**30


def loss_impls():
    out = {
        "fastkern chunked": lambda h, w, y: fastkern.ops.fused_linear_cross_entropy(h, w, y, impl="chunked"),
        "fastkern onchip": lambda h, w, y: fastkern.ops.fused_linear_cross_entropy(h, w, y, impl="onchip"),
    }
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction  # noqa: F401
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["Liger FLCE"] = lambda h, w, y: liger(w, h, y)
    except Exception as exc:
        print(f"liger_kernel: not importable ({type(exc).__name__}: {str(exc)[:80]})")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["CCE"] = lambda h, w, y: cce(h, w, y)
    except Exception as exc:
        print(f"cut_cross_entropy: not importable ({type(exc).__name__}: {str(exc)[:80]})")
    return out


def logprob_impls():
    def fk(impl):
        def f(h, w, y):
            lp, ent = fastkern.ops.fused_linear_logprobs(h, w, y, return_entropy=True, impl=impl)
            return -lp.mean() - 0.01 * ent.mean()
        return f

    out = {"fastkern chunked logprobs+entropy": fk("chunked"), "fastkern onchip logprobs+entropy": fk("onchip")}
    try:
        from trl.kernels import ChunkedLogProbFunction

        def trl_fn(h, w, y):
            lp, ent = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ("entropy",))[:2]
            return -lp.mean() - 0.01 * ent.mean()

        out["TRL 1.16 logprobs+entropy"] = trl_fn
    except Exception as exc:
        print(f"trl: not importable ({type(exc).__name__}: {str(exc)[:80]})")
    return out


def step(fn, h, w, y):
    h.grad = w.grad = None
    loss = fn(h, w, y)
    loss.backward()
    return loss


def result(fn, h, w, y):
    loss = step(fn, h, w, y).detach().float()
    out = (loss, h.grad, w.grad)
    h.grad = w.grad = None
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def measure(fn, h, w, y, rep_ms):
    import triton

    h.grad = w.grad = None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(fn, h, w, y)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(lambda: step(fn, h, w, y), warmup=2 * rep_ms // 5, rep=rep_ms, return_mode="median")
    h.grad = w.grad = None
    return ms, peak


# Rows left when this many seconds have passed are reported as skipped (the device call is capped).
TIME_BUDGET_S = 220


def run_config(label, n, v, trainable, impls, rows, started):
    if time.time() - started > TIME_BUDGET_S:
        print(f"{label}: skipped (time budget)", flush=True)
        rows += [dict(config=label, impl=name, ms=None, peak_gib=None, note="skipped (time budget)") for name in impls]
        return
    torch.manual_seed(0)
    h = (torch.randn(n, H, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, H, device="cuda") / 64).to(torch.bfloat16).requires_grad_(trainable)
    y = torch.randint(0, v, (n,), device="cuda")
    names = list(impls)
    ref = result(impls[names[0]], h, w, y)  # the chunked path is the reference
    rep_ms = 300 if n <= 8192 else 600
    for name in names:
        try:
            got = ref if name == names[0] else result(impls[name], h, w, y)
            errs = [rel(got[0], ref[0])] + [rel(g, r) for g, r in zip(got[1:], ref[1:]) if g is not None and r is not None]
            note = "errors vs chunked " + ", ".join(f"{e:.1e}" for e in errs)
            if errs[0] > 1e-3 or any(e > 2e-2 for e in errs[1:]):
                print(f"{label} {name}: WRONG ({note}); not timed", flush=True)
                rows.append(dict(config=label, impl=name, ms=None, peak_gib=None, note="WRONG " + note))
                continue
            del got
            ms, peak = measure(impls[name], h, w, y, rep_ms)
        except torch.cuda.OutOfMemoryError:
            rows.append(dict(config=label, impl=name, ms=None, peak_gib=None, note="out of memory"))
            print(f"{label} {name}: out of memory", flush=True)
            continue
        except Exception as exc:  # a peer that cannot run this configuration
            rows.append(dict(config=label, impl=name, ms=None, peak_gib=None, note=f"{type(exc).__name__}"))
            print(f"{label} {name}: failed ({type(exc).__name__}: {str(exc)[:120]})", flush=True)
            continue
        finally:
            h.grad = w.grad = None
            gc.collect()
            torch.cuda.empty_cache()
        print(f"{label} {name}: {ms:.2f} ms, {peak / 2**20:.0f} MiB ({note})", flush=True)
        rows.append(dict(config=label, impl=name, ms=ms, peak_gib=peak / GIB, note=note))
    del h, w, y, ref
    gc.collect()
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true", help="only the V=128256 rows")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    assert torch.cuda.is_available(), "the benchmark needs a CUDA device"
    started = time.time()
    rows = []
    ce, lp = loss_impls(), logprob_impls()
    # Most important first: the V128256 rows, GRPO's log-probs, then the larger vocabularies.
    plan = [(8192, 128256, ce, ""), (32768, 128256, ce, ""), (8192, 128256, lp, " logprobs+entropy")]
    plan += [] if args.quick else [(8192, 151936, ce, ""), (8192, 262144, ce, "")]
    for n, v, impls, what in plan:
        for trainable in (True, False):
            label = f"N{n} V{v} {'trainable' if trainable else 'frozen'}{what}"
            run_config(label, n, v, trainable, impls, rows, started)
    print(f"\nbench time {time.time() - started:.0f} s\n")
    print("| config | impl | ms | peak extra MiB | check |")
    print("|---|---|---|---|---|")
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
        pk = "-" if r["peak_gib"] is None else f"{r['peak_gib'] * 1024:.0f}"
        print(f"| {r['config']} | {r['impl']} | {ms} | {pk} | {r['note']} |")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=time.time() - started)
    with open(os.path.join(args.out, "bench_linear_cross_entropy_onchip.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
