"""LoRA layer forward+backward side by side: fastkern (16-bit and NF4 base) vs PEFT vs PEFT+bitsandbytes.

    python3 bench/bench_lora_linear.py --out DIR

Layer 4096 -> 14336, r 16, alpha 32, bf16, no bias, base frozen; x requires grad (as inside a model),
M = 512, 2048, 8192 tokens. One step = forward + backward (dX, dA, dB). Each implementation is checked
first against an fp32 computation with the same (dequantized) base weight: output and all three
gradients within 2e-2 relative error norm, else the row is not timed. Peak memory is measured beyond
the inputs, the layer and grad_out.
"""

import argparse
import json
import os

import torch
import torch.nn as nn

K, N, R, ALPHA = 4096, 14336, 16, 32
MS = (512, 2048, 8192)
DT = torch.bfloat16


class _Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj


def _peft_layer(base):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(_Holder(base), cfg)
    layer = model.base_model.model.proj
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        p.data = p.data.to(DT)
    return model, layer


def build():
    """name -> (callable x -> y, lora_A param, lora_B param, dense fp32 weight for the check)."""
    torch.manual_seed(0)
    w = (torch.randn(N, K, device="cuda") / K**0.5).to(DT)
    a = nn.Parameter((torch.randn(R, K, device="cuda") / K**0.5).to(DT))
    b = nn.Parameter((torch.randn(N, R, device="cuda") / R**0.5).to(DT))
    s = ALPHA / R
    impls = {}
    from fastkern.ops import lora_linear

    impls["fastkern 16-bit"] = (lambda x: lora_linear(x, w, a, b, s), a, b, w.float())

    def formula(x, w_, a_, b_):
        return x @ w_.T + s * ((x @ a_.T) @ b_.T)

    impls["torch eager 16-bit"] = (lambda x: formula(x, w, a, b), a, b, w.float())
    compiled = torch.compile(formula)
    impls["torch.compile 16-bit"] = (lambda x: compiled(x, w, a, b), a, b, w.float())
    try:
        import peft  # noqa: F401

        base = nn.Linear(K, N, bias=False, device="cuda", dtype=DT)
        base.weight.data.copy_(w)
        base.weight.requires_grad_(False)
        _, layer = _peft_layer(base)
        layer.lora_A["default"].weight.data.copy_(a.data)
        layer.lora_B["default"].weight.data.copy_(b.data)
        impls["peft 16-bit"] = (layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight, w.float())
    except ImportError:
        print("peft: not installed")
    try:
        import bitsandbytes as bnb
    except ImportError:
        print("bitsandbytes: not installed; fastkern NF4 uses nf4_quantize")
        from fastkern.ops import nf4_dequantize, nf4_quantize

        packed, state = nf4_quantize(w)
        impls["fastkern nf4"] = (lambda x: lora_linear(x, packed, a, b, s, quant_state=state), a, b,
                                 nf4_dequantize(packed, state).float())
        return impls
    q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DT, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4")
    q = q.cuda()
    packed, state = q.weight.data, q.weight.quant_state
    dense = bnb.functional.dequantize_4bit(packed, state, quant_type="nf4").float()
    impls["fastkern nf4"] = (lambda x: lora_linear(x, packed, a, b, s, quant_state=state), a, b, dense)
    impls["nf4_matmul composed (in-tile, opt-in)"] = (in_tile_nf4_layer(packed, state, a, b, s), a, b, dense)
    try:
        _, qlayer = _peft_layer(q)
        qlayer.lora_A["default"].weight.data.copy_(a.data)
        qlayer.lora_B["default"].weight.data.copy_(b.data)
        impls["peft+bnb nf4"] = (qlayer, qlayer.lora_A["default"].weight, qlayer.lora_B["default"].weight, dense)
    except ImportError:
        pass
    return impls


def in_tile_nf4_layer(packed, state, a, b, s):
    """The NF4 LoRA layer composed from ``ops.nf4_matmul`` (W dequantized inside the GEMM tiles, never
    in 16 bits) and plain torch for the rank-r term; autograd runs nf4_matmul(transpose=True) for dX.
    Not what ``lora_linear`` does (it dequantizes W, docs/nf4_lora.md): a row to decide whether to."""
    from fastkern.ops import nf4_matmul

    def layer(x):
        return nf4_matmul(x, packed, state).addmm_(x @ a.T, b.T, alpha=s)

    return layer


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(fn, a, b, dense, m):
    x = torch.randn(m, K, device="cuda", dtype=DT, requires_grad=True)
    dy = torch.randn(m, N, device="cuda", dtype=DT)
    a.grad = b.grad = None
    y = fn(x)
    y.backward(dy)
    x32 = x.detach().float().requires_grad_()
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    y32 = x32 @ dense.T + (ALPHA / R) * ((x32 @ a32.T) @ b32.T)
    y32.backward(dy.float())
    errs = [rel(y, y32), rel(x.grad, x32.grad), rel(a.grad, a32.grad), rel(b.grad, b32.grad)]
    a.grad = b.grad = None
    return max(errs)


def main():
    from triton.testing import do_bench

    try:  # run as a script (bench/ on sys.path) or imported as bench.bench_lora_linear
        from graph_time import graph_ms
    except ImportError:
        from bench.graph_time import graph_ms

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    impls = build()
    results = []
    for m in MS:
        x = torch.randn(m, K, device="cuda", dtype=DT, requires_grad=True)
        dy = torch.randn(m, N, device="cuda", dtype=DT)
        for name, (fn, a, b, dense) in impls.items():
            row = dict(m=m, impl=name)
            err = check(fn, a, b, dense, m)
            row["rel_err"] = err
            if not err < 2e-2:
                row["error"] = f"wrong result: relative error {err:.2e}"
                results.append(row)
                print(row, flush=True)
                continue

            def step():
                x.grad = a.grad = b.grad = None
                fn(x).backward(dy)

            ms = do_bench(step, warmup=10, rep=100, return_mode="median")
            gpu_ms = graph_ms(step, name)
            with torch.no_grad():
                fwd_ms = do_bench(lambda: fn(x), warmup=10, rep=100, return_mode="median")
            torch.cuda.synchronize()
            x.grad = a.grad = b.grad = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row.update(fwd_ms=fwd_ms, fwd_bwd_ms=ms, fwd_bwd_graph_ms=gpu_ms, tflops=2 * 2 * m * N * K / ms / 1e9,
                       peak_extra_mib=(torch.cuda.max_memory_allocated() - base) / 2**20)
            x.grad = a.grad = b.grad = None
            results.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    profile(impls, 512)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_lora_linear.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=results), f, indent=1)
    print("\n| M | impl | fwd ms | fwd+bwd ms | fwd+bwd GPU ms (CUDA graph) | base-GEMM TFLOP/s | peak extra MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "fwd_bwd_ms" in r:
            print(f"| {r['m']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_graph_ms']:.3f} | "
                  f"{r['tflops']:.0f} | {r['peak_extra_mib']:.0f} |")
        else:
            print(f"| {r['m']} | {r['impl']} | {r['error']} | | | | |")


def profile(impls, m):
    """Where one fwd+bwd step spends GPU time, and the host time per step (to spot launch-bound rows)."""
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = torch.randn(m, K, device="cuda", dtype=DT, requires_grad=True)
    dy = torch.randn(m, N, device="cuda", dtype=DT)
    for name in ("fastkern 16-bit", "peft 16-bit", "fastkern nf4", "peft+bnb nf4"):
        if name not in impls:
            continue
        fn = impls[name][0]
        for _ in range(3):
            fn(x).backward(dy)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn(x).backward(dy)
        host_ms = (time.perf_counter() - t0) / 20 * 1e3  # enqueue time (GPU keeps running)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn(x).backward(dy)
            torch.cuda.synchronize()
        print(f"\n### profile M={m} {name}: host enqueue {host_ms:.3f} ms/step (5 steps below)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main()
