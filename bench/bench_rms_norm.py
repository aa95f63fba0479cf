"""RMSNorm fwd+bwd side by side on one GPU: fastkern vs transformers' math in eager PyTorch (what
LlamaRMSNorm / GemmaRMSNorm run) vs torch.compile of it vs Liger's RMSNorm function, llama and gemma
forms, weight trainable and frozen.

    python3 bench/bench_rms_norm.py --out DIR

Every row is checked against an fp32 computation first (a wrong row is not timed). Time: do_bench
median. Memory: what autograd saves for backward (the quantity the patch is about: bytes of saved
tensors beyond the input and the weight, counted with saved_tensors_hooks) and the peak allocated
during forward+backward beyond the inputs and grad_out. Bandwidth counts the fewest bytes: forward
reads x and writes y; backward reads x and dy and writes dx (the weight and rstd are negligible).
"""

import argparse
import json
import os

import torch

SHAPES = [(16384, 4096), (9216, 1024), (9216 * 16, 128)]  # a Llama-8B layer's rows; Qwen3-0.6B; its q_norm rows
# Elements per tile tried besides the default for rows narrower than 2048 (fastkern.ops.rms_norm stacks
# narrow rows into tiles of about this many elements): rows named "fastkern tile=N".
TILE_SWEEP = (1024, 4096, 8192)


def copy_tbps(do_bench) -> float:
    """This GPU's device-to-device copy bandwidth (bytes read + written per second), the ceiling."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() / ms / 1e9


def implementations(form, n_cols):
    import importlib

    import fastkern

    rms_ops = importlib.import_module("fastkern.ops.rms_norm")  # the module (fastkern.ops.rms_norm is the function)
    offset, cast = (0.0, True) if form == "llama" else (1.0, False)

    def fk(x, w):
        return fastkern.ops.rms_norm(x, w, 1e-6, weight_offset=offset, cast_before_weight=cast)

    def fk_tile(tile):
        def run(x, w):
            default, rms_ops._TILE_ELEMENTS = rms_ops._TILE_ELEMENTS, tile
            try:
                return fk(x, w)
            finally:
                rms_ops._TILE_ELEMENTS = default
        return run

    def eager(x, w):
        xf = x.float()
        xh = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * xh.to(x.dtype) if form == "llama" else (xh * (1.0 + w.float())).to(x.dtype)

    # A fresh compiled function per shape and weight mode: one shared function would hit dynamo's
    # recompile limit after 8 variants and silently run eager for the rest (seen in the first H200 run).
    torch._dynamo.reset()
    impls = {"fastkern": fk, "transformers eager": eager, "torch.compile": torch.compile(eager, dynamic=False)}
    if n_cols < 2048 and form == "llama":
        impls.update({f"fastkern tile={t}": fk_tile(t) for t in TILE_SWEEP})
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        casting = "llama" if form == "llama" else "gemma"
        impls["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, offset, casting, False)
    except Exception as exc:
        print(f"liger: not available ({type(exc).__name__}: {exc})")
    return impls


def reference(x, w, form):
    xf = x.float()
    xh = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w.float() * xh.to(x.dtype).float() if form == "llama" else xh * (1.0 + w.float())


def saved_bytes(fn, x, w):
    seen, total = {x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}, [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, w)
    return total[0]


def main():
    from triton.testing import do_bench

    try:  # run as a script (bench/ on sys.path) or imported as bench.bench_rms_norm
        from graph_time import graph_ms
    except ImportError:
        from bench.graph_time import graph_ms

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    rows = []
    ceiling = copy_tbps(do_bench)
    print(f"device-to-device copy: {ceiling:.2f} TB/s", flush=True)
    for form in ("llama", "gemma"):
        for n_rows, n_cols in SHAPES:
            for trainable in (True, False):
                impls = implementations(form, n_cols)
                torch.manual_seed(0)
                x = torch.randn(n_rows, n_cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                w = (torch.randn(n_cols, device="cuda") * 0.1 + (1.0 if form == "llama" else 0.0)).to(
                    torch.bfloat16).requires_grad_(trainable)
                dy = torch.randn_like(x)
                x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_(trainable)
                ref = reference(x32, w32, form)
                ref_grads = torch.autograd.grad(ref, (x32, w32) if trainable else (x32,), dy.float())
                for name, fn in impls.items():
                    row = dict(form=form, rows=n_rows, cols=n_cols, weight="trainable" if trainable else "frozen",
                               impl=name)
                    try:
                        y = fn(x, w)
                        grads = torch.autograd.grad(y, (x, w) if trainable else (x,), dy)
                        errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip((y, *grads), (ref, *ref_grads))]
                        del y, grads  # the correctness check's graph is not kept alive into the timings
                        row["rel_err"] = max(errs)
                        if not row["rel_err"] < 2e-2:
                            row["error"] = f"wrong result: relative error {row['rel_err']:.2e}"
                            rows.append(row)
                            print(row, flush=True)
                            continue
                        with torch.no_grad():
                            fwd = do_bench(lambda: fn(x, w), warmup=25, rep=100, return_mode="median")
                        both = do_bench(lambda: torch.autograd.grad(fn(x, w), (x, w) if trainable else (x,), dy),
                                        warmup=25, rep=100, return_mode="median")
                        # Fresh leaves for the capture: their AccumulateGrad nodes are then created on the
                        # capture's side stream. A node created earlier on the default stream and still held
                        # (torch.compile's rows hold one even after `del y, grads`) makes backward sync with
                        # the default stream, which invalidates the capture on torch 2.11 (H200, 2026-12-04).
                        xg = x.detach().clone().requires_grad_()
                        wg = w.detach().clone().requires_grad_(trainable)
                        both_graph = graph_ms(lambda: torch.autograd.grad(fn(xg, wg), (xg, wg) if trainable else (xg,),
                                                                          dy), name)
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        grads = torch.autograd.grad(fn(x, w), (x, w) if trainable else (x,), dy)
                        torch.cuda.synchronize()
                        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                        del grads
                        nbytes = x.numel() * x.element_size()
                        row.update(fwd_ms=fwd, fwd_tbps=2 * nbytes / fwd / 1e9, fwd_bwd_ms=both,
                                   fwd_bwd_graph_ms=both_graph, fwd_bwd_graph_tbps=5 * nbytes / both_graph / 1e9,
                                   fwd_bwd_tbps=5 * nbytes / both / 1e9, peak_extra_mib=peak,
                                   saved_mib=saved_bytes(fn, x, w) / 2**20)
                    except Exception as exc:  # a peer that does not support a case is reported, not fatal
                        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                    rows.append(row)
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_rms_norm.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_tbps=ceiling, rows=rows), f,
                  indent=1)
    print(f"\n{torch.cuda.get_device_name()}; copy ceiling {ceiling:.2f} TB/s")
    print("\n| form | rows x cols | weight | impl | fwd ms | fwd+bwd ms | fwd+bwd GPU ms (CUDA graph), TB/s (% copy) "
          "| saved for backward MiB | peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = f"{r['rows']}x{r['cols']}"
        if "error" in r:
            print(f"| {r['form']} | {shape} | {r['weight']} | {r['impl']} | {r['error']} | | | | |")
            continue
        print(f"| {r['form']} | {shape} | {r['weight']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
              f"{r['fwd_bwd_graph_ms']:.3f}, {r['fwd_bwd_graph_tbps']:.2f} ({100 * r['fwd_bwd_graph_tbps'] / ceiling:.0f}%) | "
              f"{r['saved_mib']:.1f} | "
              f"{r['peak_extra_mib']:.0f} |")


if __name__ == "__main__":
    main()
