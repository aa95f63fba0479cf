"""Host time of a LoRA layer step on the GPU at M512, split by where it goes.

    python3 bench/host_lora_gpu.py

Layer 4096 -> 14336, r16, bf16, M = 512: the GPU work of one forward+backward is ~0.2 ms, so the
host's enqueue time decides the wall clock (docs/nf4_lora.md: fastkern 0.82 ms vs PEFT 0.49 ms wall
on an H200, with ``aten::mm`` costing 112 us of CPU per call in fastkern's backward). Rows, each the
mean host time per call over a loop with no synchronization inside (the GPU queue never fills:
few launches per step, 20 steps):

* every GEMM and elementwise call the fused layer makes, alone, on the main thread;
* the fused step three ways: through autograd (backward on autograd's device thread), the same
  implementation functions called directly on the main thread, and directly on a fresh Python thread;
* PEFT's layer step through autograd, for comparison;
* eight layers summed under one backward (as in a model, where the hand-off to autograd's thread
  happens once per step), per layer: host time, do_bench wall time and CUDA-graph GPU time, 16-bit
  (fastkern vs PEFT) and NF4 double quant (fastkern vs PEFT + bitsandbytes);
* the cuBLAS backend torch prefers, and a profiler table (self CPU time, by op and input shape) of
  five fused steps and five PEFT steps.
"""

import threading
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastkern.ops import lora_linear
from fastkern.ops.lora_linear import _backward_impl, _forward_impl

M, K, N, R, S = 512, 4096, 14336, 16, 2.0
DT = torch.bfloat16
STEPS = 20


def _host_us(fn, steps=STEPS) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    host = (time.perf_counter() - t0) / steps
    torch.cuda.synchronize()
    return host * 1e6


def _on_thread(fn) -> float:
    result = []
    t = threading.Thread(target=lambda: result.append(_host_us(fn)))
    t.start()
    t.join()
    return result[0]


def main():
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, preferred BLAS: "
          f"{torch.backends.cuda.preferred_blas_library()}")
    w = (torch.randn(N, K, device="cuda") / K**0.5).to(DT)
    a = nn.Parameter((torch.randn(R, K, device="cuda") / K**0.5).to(DT))
    b = nn.Parameter((torch.randn(N, R, device="cuda") / R**0.5).to(DT))
    x = torch.randn(M, K, device="cuda", dtype=DT, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=DT)
    xs = F.linear(x.detach(), a.detach()) * S
    g = torch.mm(dy, b.detach()) * S
    out = torch.empty(M, N, device="cuda", dtype=DT)
    gx = torch.empty(M, K, device="cuda", dtype=DT)
    rows = {}
    with torch.no_grad():
        rows["F.linear(x, A) [512x4096]x[16x4096]^T"] = _host_us(lambda: F.linear(x, a))
        rows["xs.mul_(s)"] = _host_us(lambda: xs.mul_(1.0))
        rows["F.linear(xs, B) [512x16]x[14336x16]^T"] = _host_us(lambda: F.linear(xs, b))
        rows["out.addmm_(x, W.t()) (beta 1, the base GEMM)"] = _host_us(lambda: out.addmm_(x, w.t()))
        rows["torch.mm(x, W.t()) (the same GEMM, fresh output)"] = _host_us(lambda: torch.mm(x, w.t()))
        rows["torch.mm(dy, B) [512x14336]x[14336x16]"] = _host_us(lambda: torch.mm(dy, b))
        rows["torch.mm(g, A) [512x16]x[16x4096]"] = _host_us(lambda: torch.mm(g, a))
        rows["gx.addmm_(dy, W) (beta 1, dX GEMM)"] = _host_us(lambda: gx.addmm_(dy, w))
        rows["torch.mm(g.t(), x) (dA)"] = _host_us(lambda: torch.mm(g.t(), x))
        rows["torch.mm(dy.t(), xs) (dB)"] = _host_us(lambda: torch.mm(dy.t(), xs))
        rows["dy.contiguous() (no copy)"] = _host_us(lambda: dy.contiguous())
        rows["same dX GEMM on a fresh thread"] = _on_thread(lambda: gx.addmm_(dy, w))

    def autograd_step():
        x.grad = a.grad = b.grad = None
        lora_linear(x, w, a, b, S).backward(dy)

    def direct_step():
        with torch.no_grad():
            y, xs_ = _forward_impl(x, w, a, b, None, None, S)
            _backward_impl(dy, x, xs_, w, a, b, None, S, True, True, True, False)

    rows["fused step via autograd (backward on autograd's thread)"] = _host_us(autograd_step)
    rows["fused step, implementation called on the main thread"] = _host_us(direct_step)
    rows["fused step, implementation called on a fresh thread"] = _on_thread(direct_step)

    try:  # run as a script (bench/ on sys.path) or imported as bench.host_lora_gpu
        from bench_lora_linear import _peft_layer
    except ImportError:
        from bench.bench_lora_linear import _peft_layer

    def dense_base(weight=None):
        base = nn.Linear(K, N, bias=False, device="cuda", dtype=DT)
        if weight is not None:
            base.weight.data.copy_(weight)
        return base

    _, layer = _peft_layer(dense_base())  # the same PEFT layer (r16, alpha 32, bf16 adapters) as the layer bench

    def peft_step():
        x.grad = None
        layer(x).backward(dy)

    rows["PEFT layer step via autograd"] = _host_us(peft_step)

    # In a model, autograd hands the backward to its device thread once per step, not once per layer:
    # eight layers on the same x, outputs summed, one backward; per layer = total / 8.
    ws = [(torch.randn(N, K, device="cuda") / K**0.5).to(DT) for _ in range(8)]

    def fused_chain():
        x.grad = a.grad = b.grad = None
        sum(lora_linear(x, w_, a, b, S) for w_ in ws).backward(dy)

    layers = [_peft_layer(dense_base(w_))[1] for w_ in ws]

    def peft_chain():
        x.grad = None
        sum(layer_(x) for layer_ in layers).backward(dy)

    import bitsandbytes as bnb

    quantized = []
    for w_ in ws:
        base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DT, quant_type="nf4", compress_statistics=True)
        base.weight = bnb.nn.Params4bit(w_.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True)
        quantized.append(base.cuda())

    def fused_nf4_chain():
        x.grad = a.grad = b.grad = None
        sum(lora_linear(x, q_.weight, a, b, S, quant_state=q_.weight.quant_state) for q_ in quantized).backward(dy)

    nf4_layers = [_peft_layer(q_)[1] for q_ in quantized]

    def peft_nf4_chain():
        x.grad = None
        sum(layer_(x) for layer_ in nf4_layers).backward(dy)

    rows["fused, 8 layers in one backward, per layer"] = _host_us(fused_chain) / 8
    rows["PEFT, 8 layers in one backward, per layer"] = _host_us(peft_chain) / 8
    from triton.testing import do_bench

    rows["fused, 8 layers, do_bench wall per layer"] = do_bench(fused_chain, warmup=10, rep=100) * 1e3 / 8
    rows["PEFT, 8 layers, do_bench wall per layer"] = do_bench(peft_chain, warmup=10, rep=100) * 1e3 / 8
    rows["fused NF4, 8 layers, do_bench wall per layer"] = do_bench(fused_nf4_chain, warmup=10, rep=100) * 1e3 / 8
    rows["PEFT+bnb NF4, 8 layers, do_bench wall per layer"] = do_bench(peft_nf4_chain, warmup=10, rep=100) * 1e3 / 8
    try:  # run as a script (bench/ on sys.path) or imported as bench.host_lora_gpu
        from graph_time import graph_ms
    except ImportError:
        from bench.graph_time import graph_ms
    for name, fn in (("fused", fused_chain), ("PEFT", peft_chain), ("fused NF4", fused_nf4_chain),
                     ("PEFT+bnb NF4", peft_nf4_chain)):
        rows[f"{name}, 8 layers, GPU time (CUDA graph) per layer"] = graph_ms(fn, name) * 1e3 / 8
    print("\n| call | host us per call |\n|---|---|")
    for name, us in rows.items():
        print(f"| {name} | {us:.1f} |")

    from torch.profiler import ProfilerActivity, profile

    for name, step in (("fused", autograd_step), ("PEFT", peft_step)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"\n### {name}: 5 steps, by self CPU time")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=14,
                                                                   max_name_column_width=40,
                                                                   max_shapes_column_width=60))


if __name__ == "__main__":
    main()
