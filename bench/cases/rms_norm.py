"""RMSNorm fwd+bwd: fastkern vs transformers' math in eager PyTorch (what LlamaRMSNorm / GemmaRMSNorm
run) vs torch.compile of it vs Liger, llama and gemma forms, weight trainable and frozen.

Every row is checked against an fp32 computation first. Times: fwd and fwd+bwd (do_bench, wall) and
fwd+bwd GPU (CUDA graph). Memory: peak extra during fwd+bwd and, in ``extra.saved_mib``, what autograd
saves for backward beyond the input and the weight (counted with saved_tensors_hooks; the quantity the
patch is about). Bytes that must move: forward reads x and writes y; fwd+bwd adds reading x and dy and
writing dx (5 tensors; the weight and rstd are negligible). Also the device-to-device copy bandwidth
(op ``copy``), the ceiling the % columns of docs/benchmarks.md use.
"""

import torch

import fastkern
from measure import describe, rel_err, saved_bytes

SHAPES = [(16384, 4096), (9216, 1024), (9216 * 16, 128)]  # a Llama-8B layer's rows; Qwen3-0.6B; its q_norm rows
TINY = [(5, 48)]


def implementations(form, cuda):
    offset, cast = (0.0, True) if form == "llama" else (1.0, False)

    def eager(x, w):
        xf = x.float()
        xh = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * xh.to(x.dtype) if form == "llama" else (xh * (1.0 + w.float())).to(x.dtype)

    impls = {"fastkern": lambda x, w: fastkern.ops.rms_norm(x, w, 1e-6, weight_offset=offset, cast_before_weight=cast),
             "transformers eager": eager}
    if cuda:
        # A fresh compiled function per shape and weight mode: one shared function would hit dynamo's
        # recompile limit after 8 variants and silently run eager for the rest.
        torch._dynamo.reset()
        impls["torch.compile"] = torch.compile(eager, dynamic=False)
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        casting = "llama" if form == "llama" else "gemma"
        impls["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, offset, casting, False)
    except Exception as exc:
        print(f"liger: not available ({type(exc).__name__})")
    return impls


def reference(x, w, form):
    xf = x.float()
    xh = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w.float() * xh.to(x.dtype).float() if form == "llama" else xh * (1.0 + w.float())


def copy_ceiling(bench):
    n = 2**30 if bench.cuda else 2**20
    src = torch.empty(n, dtype=torch.uint8, device=bench.device)
    dst = torch.empty_like(src)
    ms = bench.ms(lambda: dst.copy_(src), warmup=10, rep=50)
    bench.add("copy", "device-to-device copy", f"{n} bytes", "torch copy_", dtype=torch.uint8, ms=ms,
              throughput=2 * n / ms / 1e6, throughput_unit="GB/s")


def run(bench):
    copy_ceiling(bench)
    for form in ("llama", "gemma"):
        for n_rows, n_cols in TINY if bench.tiny else SHAPES:
            for trainable in (True, False):
                shape = f"{n_rows}x{n_cols} {form}, weight {'trainable' if trainable else 'frozen'}"
                one_form(bench, form, n_rows, n_cols, trainable, shape)


def one_form(bench, form, n_rows, n_cols, trainable, shape):
    torch.manual_seed(0)
    x = torch.randn(n_rows, n_cols, device=bench.device, dtype=bench.dtype, requires_grad=True)
    w = (torch.randn(n_cols, device=bench.device) * 0.1 + (1.0 if form == "llama" else 0.0)).to(
        bench.dtype).requires_grad_(trainable)
    dy = torch.randn_like(x)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_(trainable)
    ref = reference(x32, w32, form)
    ref_grads = torch.autograd.grad(ref, (x32, w32) if trainable else (x32,), dy.float())
    wrt = (x, w) if trainable else (x,)
    nbytes = x.numel() * x.element_size()
    for name, fn in implementations(form, bench.cuda).items():
        try:
            y = fn(x, w)
            grads = torch.autograd.grad(y, wrt, dy)
            err = max(rel_err(a, b) for a, b in zip((y, *grads), (ref, *ref_grads)))
            del y, grads  # the check's graph is not kept alive into the timings
            if not err < 2e-2:
                bench.add("rms_norm", "fwd+bwd", shape, name, error=f"wrong result: relative error {err:.2e}")
                continue
            with torch.no_grad():
                fwd = bench.ms(lambda: fn(x, w))
            both = bench.ms(lambda: torch.autograd.grad(fn(x, w), wrt, dy))
            # Fresh leaves for the capture: their AccumulateGrad nodes are then created on the capture's
            # side stream (a node created earlier on the default stream and still held makes backward
            # sync with the default stream, which invalidates the capture).
            xg = x.detach().clone().requires_grad_()
            wg = w.detach().clone().requires_grad_(trainable)
            graph = bench.graph_ms(lambda: torch.autograd.grad(fn(xg, wg), (xg, wg) if trainable else (xg,), dy), name)
            peak = bench.peak_mib(lambda: torch.autograd.grad(fn(x, w), wrt, dy))
            saved = saved_bytes(fn, (x, w)) / 2**20
        except Exception as exc:  # a peer that does not support a case is reported, not fatal
            bench.add("rms_norm", "fwd+bwd", shape, name, error=describe(exc, 200))
            continue
        bench.add("rms_norm", "fwd", shape, name, ms=fwd, throughput=2 * nbytes / fwd / 1e6, throughput_unit="GB/s",
                  rel_err=err)
        bench.add("rms_norm", "fwd+bwd", shape, name, ms=both, throughput=5 * nbytes / both / 1e6,
                  throughput_unit="GB/s", peak_mib=peak, rel_err=err, saved_mib=saved)
        if graph is not None:
            bench.add("rms_norm", "fwd+bwd GPU (CUDA graph)", shape, name, ms=graph,
                      throughput=5 * nbytes / graph / 1e6, throughput_unit="GB/s")
