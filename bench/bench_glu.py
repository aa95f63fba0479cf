"""SwiGLU / GeGLU side by side on one GPU: fastkern vs torch eager vs torch.compile vs Liger.

    python3 bench/bench_glu.py --out DIR

Checks each implementation against an fp32 computation at the bench shape first (a wrong row is
not timed), then times forward and forward+backward with triton.testing.do_bench (median) and
measures peak memory beyond the inputs and grad_out. Effective bandwidth counts the fewest bytes:
forward reads gate, up and writes out (3 tensors); backward reads grad_out, gate, up and writes two
grads (5 tensors).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from glu_impls import SHAPES, fwd_bwd, implementations, make_inputs  # noqa: E402


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(fn, act, rows, cols):
    from glu_impls import torch_glu

    g, u, d = make_inputs(rows, cols, torch.bfloat16, "cuda")
    g32 = g.detach().float().requires_grad_()
    u32 = u.detach().float().requires_grad_()
    ref = torch_glu(act)(g32, u32)
    rg, ru = torch.autograd.grad(ref, (g32, u32), d.float())
    out = fn(g, u)
    err_out = rel_err(out, ref)
    dg, du = torch.autograd.grad(out, (g, u), d)
    return max(err_out, rel_err(dg, rg), rel_err(du, ru))


def peak_extra_mib(fn, g, u, d):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = fwd_bwd(fn, g, u, d)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del grads
    return peak / 2**20


def main():
    from triton.testing import do_bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the BLOCK/num_warps sweep")
    args = parser.parse_args()
    results = []
    for act in ("silu", "gelu_tanh"):
        impls = implementations(act)
        for rows, cols in SHAPES:
            n = rows * cols
            for name, fn in impls.items():
                err = check(fn, act, rows, cols)
                row = dict(act=act, rows=rows, cols=cols, impl=name, rel_err=err)
                if not err < 2e-2:
                    row["error"] = f"wrong result: relative error {err:.2e}"
                    results.append(row)
                    print(row, flush=True)
                    continue
                g, u, d = make_inputs(rows, cols, torch.bfloat16, "cuda")
                with torch.no_grad():
                    fwd_ms = do_bench(lambda: fn(g, u), warmup=25, rep=100, return_mode="median")
                both_ms = do_bench(lambda: fwd_bwd(fn, g, u, d), warmup=25, rep=100, return_mode="median")
                row.update(
                    fwd_ms=fwd_ms, fwd_tbps=3 * n * 2 / fwd_ms / 1e9,
                    fwd_bwd_ms=both_ms, fwd_bwd_tbps=8 * n * 2 / both_ms / 1e9,
                    peak_extra_mib=peak_extra_mib(fn, g, u, d),
                )
                results.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                del g, u, d
    if args.sweep:
        results += sweep()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_glu.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=results), f, indent=1)
    print("\n| act | shape | impl | fwd ms | fwd TB/s | fwd+bwd ms | fwd+bwd TB/s | peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "fwd_bwd_ms" in r:
            print(f"| {r['act']} | {r['rows']}x{r['cols']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_tbps']:.2f} | "
                  f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tbps']:.2f} | {r['peak_extra_mib']:.0f} |")
        elif "sweep" in r:
            print(f"| {r['act']} | sweep flat={r['flat']} BLOCK={r['block']} warps={r['warps']} | fastkern | {r['fwd_ms']:.3f} | "
                  f"{r['fwd_tbps']:.2f} | {r['bwd_ms']:.3f} (bwd only) | {r['bwd_tbps']:.2f} | |")
        elif "error" in r:
            print(f"| {r['act']} | {r['rows']}x{r['cols']} | {r['impl']} | {r['error']} |")


def sweep():
    """Launch-config sweep at 16384x14336 bf16, calling the launchers directly."""
    from triton.testing import do_bench

    from fastkern.ops.glu import _launch_backward, _launch_forward

    rows, cols = 16384, 14336
    n = rows * cols
    g = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    u = torch.randn_like(g)
    d = torch.randn_like(g)
    out = torch.empty_like(g)
    dg, du = torch.empty_like(g), torch.empty_like(g)
    rows_out = []
    for flat in (False, True):
        for block in (1024, 2048, 4096):
            for warps in (4, 8):
                f = do_bench(lambda: _launch_forward(g, u, out, "silu", block, warps, flat), return_mode="median")
                b = do_bench(lambda: _launch_backward(d, g, u, dg, du, "silu", block, warps, flat), return_mode="median")
                rows_out.append(dict(sweep=True, act="silu", block=block, warps=warps, flat=flat, fwd_ms=f,
                                     fwd_tbps=3 * n * 2 / f / 1e9, bwd_ms=b, bwd_tbps=5 * n * 2 / b / 1e9))
    return rows_out


if __name__ == "__main__":
    main()
