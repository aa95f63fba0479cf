"""SwiGLU / GeGLU(tanh): fastkern vs torch eager vs torch.compile vs Liger, fwd and fwd+bwd.

gate/up are non-leaf views of leaves (as in an MLP, where they are activations). Each implementation
is checked against an fp32 computation at the bench shape first. Bytes that must move: forward reads
gate and up and writes out (3 tensors); fwd+bwd adds reading grad_out, gate, up and writing two grads
(8 in all). Rows per activation: fwd, fwd+bwd (do_bench), fwd+bwd wall (synchronized rounds of 5 calls:
the measure of bench/baselines/), and the host time of a tiny fwd+bwd (no sync).
"""

import torch
import torch.nn.functional as F

import fastkern
from measure import describe, rel_err

SHAPES = [(16384, 14336), (4096, 11008), (8192, 8192)]
BASELINE_SHAPES = [(16384, 14336), (4096, 11008)]
TINY = [(3, 40)]
ACTS = {"silu": "swiglu", "gelu_tanh": "geglu_tanh"}


def torch_glu(act):
    if act == "silu":
        return lambda g, u: F.silu(g) * u
    return lambda g, u: F.gelu(g, approximate="tanh") * u


def fastkern_glu(act, overwrite):
    if act == "silu":
        return lambda g, u: fastkern.ops.swiglu(g, u, overwrite_inputs_in_backward=overwrite)
    return lambda g, u: fastkern.ops.geglu(g, u, "tanh", overwrite_inputs_in_backward=overwrite)


def implementations(act, cuda):
    impls = {"fastkern": fastkern_glu(act, True), "fastkern (fresh grads)": fastkern_glu(act, False),
             "torch eager": torch_glu(act)}
    if cuda:
        impls["torch.compile"] = torch.compile(torch_glu(act))
    try:
        if act == "silu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as liger
        else:
            from liger_kernel.ops.geglu import LigerGELUMulFunction as liger
        impls["liger"] = liger.apply
    except Exception as exc:
        print(f"liger: not available ({type(exc).__name__})")
    return impls


def make_inputs(rows, cols, dtype, device):
    g_leaf = torch.randn(rows, cols, dtype=dtype, device=device, requires_grad=True)
    u_leaf = torch.randn(rows, cols, dtype=dtype, device=device, requires_grad=True)
    return g_leaf.view_as(g_leaf), u_leaf.view_as(u_leaf), torch.randn(rows, cols, dtype=dtype, device=device)


def fwd_bwd(fn, gate, up, dout):
    return torch.autograd.grad(fn(gate, up), (gate, up), dout)


def check(fn, act, g, u, d):
    g32 = g.detach().float().requires_grad_()
    u32 = u.detach().float().requires_grad_()
    ref = torch_glu(act)(g32, u32)
    rg, ru = torch.autograd.grad(ref, (g32, u32), d.float())
    g2 = g.detach().clone().requires_grad_()
    u2 = u.detach().clone().requires_grad_()
    out = fn(g2, u2)
    dg, du = torch.autograd.grad(out, (g2, u2), d)
    return max(rel_err(out, ref), rel_err(dg, rg), rel_err(du, ru))


def run(bench):
    shapes = TINY if bench.tiny else SHAPES
    for act, label in ACTS.items():
        impls = implementations(act, bench.cuda)
        for rows, cols in shapes:
            shape, n = f"{rows}x{cols}", rows * cols
            nbytes = n * torch.finfo(bench.dtype).bits // 8
            for name, fn in impls.items():
                g, u, d = make_inputs(rows, cols, bench.dtype, bench.device)
                try:
                    err = check(fn, act, g, u, d)
                except Exception as exc:
                    bench.add("glu", f"{label} fwd+bwd", shape, name, error=describe(exc))
                    continue
                if not err < 2e-2:
                    bench.add("glu", f"{label} fwd+bwd", shape, name, error=f"wrong result: relative error {err:.2e}")
                    continue
                with torch.no_grad():
                    fwd = bench.ms(lambda: fn(g, u))
                bench.add("glu", f"{label} fwd", shape, name, ms=fwd, throughput=3 * nbytes / fwd / 1e6,
                          throughput_unit="GB/s", rel_err=err)
                both = bench.ms(lambda: fwd_bwd(fn, g, u, d))
                bench.add("glu", f"{label} fwd+bwd", shape, name, ms=both, throughput=8 * nbytes / both / 1e6,
                          throughput_unit="GB/s", peak_mib=bench.peak_mib(lambda: fwd_bwd(fn, g, u, d)), rel_err=err)
                if (rows, cols) in BASELINE_SHAPES or bench.tiny:
                    # Values are not checked across rounds: fastkern and Liger write gradients into gate/up,
                    # so repeated calls drift; the check above ran on fresh inputs.
                    wall = bench.wall_ms(lambda: fwd_bwd(fn, g, u, d))
                    bench.add("glu", f"{label} fwd+bwd wall", shape, name, ms=wall,
                              throughput=8 * nbytes / wall / 1e6, throughput_unit="GB/s")
                del g, u, d
                bench.empty_cache()
        host(bench, label, impls)


def host(bench, label, impls):
    """Host time of a tiny fwd+bwd: where it exceeds the GPU time of a real-size call, the op is host-bound."""
    g, u, d = make_inputs(8, 256, bench.dtype, bench.device)
    for name, fn in impls.items():
        if name == "torch.compile":
            continue
        try:
            ms = bench.host_ms(lambda: fwd_bwd(fn, g, u, d))
        except Exception as exc:
            bench.add("glu", f"{label} fwd+bwd host (no sync)", "8x256", name, error=describe(exc))
            continue
        bench.add("glu", f"{label} fwd+bwd host (no sync)", "8x256", name, ms=ms)
