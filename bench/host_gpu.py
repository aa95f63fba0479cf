"""Host time per call on the GPU machine: how long Python + dispatch + launch take when the GPU is idle.

    python3 bench/host_gpu.py --out DIR

Tiny CUDA tensors (the kernels finish in a few microseconds), no synchronisation inside the loop:
the per-step wall time is what the host needs to issue the work. Whenever it exceeds the GPU time
of a real-size call, the op is host-bound there (docs/glu.md). Rows: fastkern swiglu fwd+bwd (fresh
and overwrite), eager PyTorch and Liger for the same math; fastkern rope fwd+bwd; bare Triton launches with 4 and 40 arguments; plus cProfiles of
the fastkern swiglu and rope steps (top entries by own time) so the next fix targets the right line.
"""

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch
import torch.nn.functional as F

import fastkern

STEPS, WARMUP = 300, 50


def _time(step) -> float:
    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / STEPS)
    return best * 1e6


def glu_step(fn):
    g0 = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u0 = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    d = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        g, u = g0 * 1, u0 * 1  # non-leaf activations, as in an MLP
        out = fn(g, u)
        torch.autograd.grad(out, (g0, u0), d)

    return step


def rope_step(projection_views: bool, fn=None):
    """projection_views: q/k are transposed views of [B, T, H, D] projection outputs, the layout attention
    modules produce (rope's fast path); else dense tensors in that permuted layout (the general path)."""
    q0 = torch.randn(1, 16, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k0 = torch.randn(1, 16, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos = torch.randn(1, 16, 64, device="cuda", dtype=torch.bfloat16)
    sin = torch.randn(1, 16, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        if projection_views:
            q, k = (q0 * 1).transpose(1, 2), (k0 * 1).transpose(1, 2)
        else:
            q, k = q0.transpose(1, 2) * 1, k0.transpose(1, 2) * 1
        qo, ko = (fn or fastkern.ops.rope)(q, k, cos, sin)
        torch.autograd.grad((qo.sum() + ko.sum()), (q0, k0))

    return step


def hf_rope(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def launch_rows(rows) -> None:
    """Bare Triton launches (no autograd, no fastkern Python) of a copy kernel with 4 and with 40 runtime
    arguments: the per-launch floor of this host, and what each extra argument (e.g. a stride) costs."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy4(x, y, n, s, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y + offs * s, tl.load(x + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def copy40(x, y, n, s, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9,
               c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, d0, d1, d2, d3, d4, d5, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        extra = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + b0 + b1 + b2 + b3 + b4 + b5 + b6 + b7 + b8 + b9
        extra += c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7 + c8 + c9 + d0 + d1 + d2 + d3 + d4 + d5
        tl.store(y + offs * s, tl.load(x + offs, mask=offs < n) + extra, mask=offs < n)

    x = torch.randn(512, device="cuda")
    y = torch.empty_like(x)
    strides = [3, 64, 128, 4096, 1, 7] * 6
    rows["bare triton launch, 4 runtime args"] = _time(lambda: copy4[(1,)](x, y, 512, 1, BLOCK=512))
    rows["bare triton launch, 40 runtime args"] = _time(lambda: copy40[(1,)](x, y, 512, 1, *strides, BLOCK=512))


class _Rows(dict):
    def __setitem__(self, name, us):  # print as measured, so a later failure keeps the earlier rows
        print(f"| {name} | {us:.1f} us |", flush=True)
        super().__setitem__(name, us)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    rows = _Rows()
    rows["empty step (two muls + autograd.grad of their sum)"] = _time(glu_step(lambda g, u: g + u))
    rows["torch eager silu(g)*u"] = _time(glu_step(lambda g, u: F.silu(g) * u))
    rows["fastkern swiglu"] = _time(glu_step(fastkern.ops.swiglu))
    rows["fastkern swiglu overwrite"] = _time(glu_step(
        lambda g, u: fastkern.ops.swiglu(g, u, overwrite_inputs_in_backward=True)))
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        rows["liger swiglu"] = _time(glu_step(LigerSiLUMulFunction.apply))
    except Exception as exc:  # liger not installed
        print("liger skipped:", exc)
    rows["fastkern rope fwd+bwd, projection views (attention modules)"] = _time(rope_step(True))
    rows["fastkern rope fwd+bwd, other layouts (general path)"] = _time(rope_step(False))
    rows["transformers apply_rotary_pos_emb fwd+bwd (eager ops)"] = _time(rope_step(True, hf_rope))
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        rows["liger rope fwd+bwd, projection views"] = _time(rope_step(True, liger_rotary_pos_emb))
    except Exception as exc:  # liger not installed
        print("liger rope skipped:", exc)
    launch_rows(rows)
    profiles = {
        "swiglu overwrite": profile(glu_step(lambda g, u: fastkern.ops.swiglu(g, u, overwrite_inputs_in_backward=True))),
        "rope fast path": profile(rope_step(True)),
    }
    for name, text in profiles.items():
        print(f"--- cProfile, {name} (500 steps)\n{text}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_gpu.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows_us=rows, profiles=profiles), f, indent=1)


def profile(step, steps: int = 500) -> str:
    """cProfile of `steps` calls (after a warm-up), top 25 entries by own time."""
    for _ in range(WARMUP):
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


if __name__ == "__main__":
    main()
