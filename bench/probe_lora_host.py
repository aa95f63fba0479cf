"""Why does the fused LoRA layer's M512 wall clock exceed PEFT's? Variants of one step, side by side.

    python3 bench/probe_lora_host.py [--out DIR]

Layer 4096 -> 14336, r16, bf16, M = 512 (GPU work ~0.22 ms per fwd+bwd, so the host decides the wall
clock). Each variant is timed by do_bench (wall, median) for one layer and per layer for eight layers
summed under one backward:

* ``fused``: ``fastkern.ops.lora_linear`` (a Python autograd.Function; its backward runs Python on
  autograd's device thread);
* ``composite``: the same GEMMs written as plain aten calls, so autograd's C++ nodes do the backward
  (one extra [M, K] add where autograd sums the two dX terms);
* ``peft``: PEFT's lora.Linear over nn.Linear;
* each again with ``torch.autograd.set_multithreading_enabled(False)``: backward on the calling
  thread, no hand-off to the device thread.

With ``--out``, chrome traces of three steps of ``fused`` and ``peft`` are written there (CPU + CUDA,
with Python stacks) to read the per-thread timeline offline.
"""

import argparse
import contextlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from triton.testing import do_bench

from fastkern.ops import lora_linear

M, K, N, R, S = 512, 4096, 14336, 16, 2.0
DT = torch.bfloat16


def composite(x, w, a, b, s):
    # Same GEMMs as the fused dense scheme, under autograd's C++ nodes.
    return F.linear(F.linear(x, a) * s, b).addmm_(x, w.t())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    try:
        from bench_lora_linear import _peft_layer
    except ImportError:
        from bench.bench_lora_linear import _peft_layer
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    ws = [(torch.randn(N, K, device="cuda") / K**0.5).to(DT) for _ in range(8)]
    a = nn.Parameter((torch.randn(R, K, device="cuda") / K**0.5).to(DT))
    b = nn.Parameter((torch.randn(N, R, device="cuda") / R**0.5).to(DT))
    x = torch.randn(M, K, device="cuda", dtype=DT, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=DT)
    layers = []
    for w in ws:
        base = nn.Linear(K, N, bias=False, device="cuda", dtype=DT)
        base.weight.data.copy_(w)
        base.weight.requires_grad_(False)
        layers.append(_peft_layer(base)[1])
    variants = {
        "fused": lambda w, i: lora_linear(x, w, a, b, S),
        "composite": lambda w, i: composite(x, w, a, b, S),
        "peft": lambda w, i: layers[i](x),
    }
    y_ref = variants["fused"](ws[0], 0)
    for name in ("composite", "peft"):
        err = ((variants[name](ws[0], 0).float() - y_ref.float()).norm() / y_ref.float().norm()).item()
        print(f"{name} vs fused forward: rel err {err:.2e}")

    def step(name, count, single_thread):
        def run():
            x.grad = a.grad = b.grad = None
            for layer in layers:
                layer.lora_A["default"].weight.grad = layer.lora_B["default"].weight.grad = None
            ctx = torch.autograd.set_multithreading_enabled(False) if single_thread else contextlib.nullcontext()
            with ctx:
                sum(variants[name](ws[i], i) for i in range(count)).backward(dy)
        return run

    print("\n| variant | 1 layer wall ms | 8 layers wall ms per layer |\n|---|---|---|")
    for name in variants:
        for single in (False, True):
            one = do_bench(step(name, 1, single), warmup=20, rep=200)
            eight = do_bench(step(name, 8, single), warmup=10, rep=200) / 8
            label = name + (", backward on the calling thread" if single else "")
            print(f"| {label} | {one:.3f} | {eight:.3f} |", flush=True)

    if args.out:
        from torch.profiler import ProfilerActivity, profile

        for name in ("fused", "peft", "composite"):
            run = step(name, 1, False)
            for _ in range(5):
                run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
                for _ in range(3):
                    run()
                torch.cuda.synchronize()
            prof.export_chrome_trace(os.path.join(args.out, f"trace_lora_{name}.json"))
            print(f"\n### {name}: 3 steps, by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=44))


if __name__ == "__main__":
    main()
