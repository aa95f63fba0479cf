"""Rotary embedding of q and k: fastkern (in place, out of place) vs transformers eager vs torch.compile vs Liger.

q and k are transposed views [B, H, T, D] of [B, T, H, D] projection outputs and cos/sin are [B, T, D]
as transformers' rotary embedding returns them. Each implementation is checked first at the bench shape
against an fp32 computation (outputs and gradients).

* fwd: one call under no_grad (do_bench). fastkern rotates in place, so it rotates the same buffers
  again on every repetition (a rotation keeps values bounded).
* fwd+bwd: the forward with autograd on, then autograd.grad of (q_rot, k_rot) w.r.t. (q, k) given
  fixed upstream gradients, timed with CUDA events around exactly those two steps. q and k are fresh
  non-leaf copies of leaves made outside the timed region (an in-place op cannot rerun on its own
  output), for every implementation alike; the copy also evicts L2.
* fwd+bwd GPU-only: the same region with a GPU sleep queued first, so the host enqueues the whole
  region before the GPU reaches it and the events time only the kernels.
Bytes that must move: fwd reads and writes q and k once and reads cos and sin; fwd+bwd twice that.
"""

import statistics
import time

import torch

import fastkern
from measure import describe, rel_err

SHAPES = [dict(b=4, t=4096, hq=32, hk=8, d=128), dict(b=1, t=65536, hq=32, hk=8, d=128)]
TINY = [dict(b=1, t=8, hq=4, hk=2, d=16)]
HOST_SHAPE = dict(b=1, t=16, hq=4, hk=2, d=64)


def implementations(cuda):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    impls = {
        "fastkern (in place)": lambda q, k, c, s: fastkern.ops.rope(q, k, c, s),
        "fastkern (out of place)": lambda q, k, c, s: fastkern.ops.rope(q, k, c, s, inplace=False),
        "transformers eager": apply_rotary_pos_emb,
    }
    if cuda:
        impls["torch.compile(transformers)"] = torch.compile(apply_rotary_pos_emb)
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        impls["liger"] = liger_rotary_pos_emb
    except ImportError as exc:
        print(f"liger_kernel: not installed ({exc})")
    return impls


def label(s):
    return f"B{s['b']} T{s['t']} Hq{s['hq']} Hk{s['hk']} D{s['d']}"


def make_inputs(b, t, hq, hk, d, dtype, device):
    torch.manual_seed(0)
    qp = torch.randn(b, t, hq, d, device=device, dtype=dtype)
    kp = torch.randn(b, t, hk, d, device=device, dtype=dtype)
    inv_freq = 500000.0 ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    f = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat([f, f], -1)[None].expand(b, -1, -1)
    cos, sin = emb.cos().to(dtype).contiguous(), emb.sin().to(dtype).contiguous()
    # Upstream gradients in the layout SDPA's backward returns for transposed-view q/k: [B, T, H, D] memory.
    gq = torch.randn(b, t, hq, d, device=device, dtype=dtype).transpose(1, 2)
    gk = torch.randn(b, t, hk, d, device=device, dtype=dtype).transpose(1, 2)
    return qp, kp, cos, sin, gq, gk


def fresh(qp, kp):
    """Leaves and non-leaf copies of them: an in-place op overwrites q, so gradients are taken with
    respect to the leaves (clone's backward passes the gradient through without a kernel)."""
    q_leaf, k_leaf = qp.detach().requires_grad_(), kp.detach().requires_grad_()
    return (q_leaf, k_leaf), (q_leaf.clone(), k_leaf.clone())


def fwd_bwd(fn, leaves, copies, cos, sin, gq, gk):
    q, k = copies
    q_rot, k_rot = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return torch.autograd.grad((q_rot, k_rot), leaves, (gq, gk))


def check(fn, qp, kp, cos, sin, gq, gk):
    """Max relative error of q_rot, k_rot, dq, dk against fp32 math."""
    def rotate(x, c, s):
        half = x.shape[-1] // 2
        return x * c[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * s[:, None]

    c32, s32 = cos.float(), sin.float()
    want = [(rotate(x.float().transpose(1, 2), c32, s32), rotate(g.float(), c32, -s32)) for x, g in ((qp, gq), (kp, gk))]
    leaves, (q, k) = fresh(qp, kp)
    q_rot, k_rot = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    got = [q_rot.detach().clone(), k_rot.detach().clone()]
    grads = [g.transpose(1, 2) for g in torch.autograd.grad((q_rot, k_rot), leaves, (gq.clone(), gk.clone()))]
    return max(max(rel_err(o, w), rel_err(g, wg)) for (w, wg), o, g in zip(want, got, grads))


def time_fwd_bwd(bench, fn, qp, kp, cos, sin, gq, gk, hide_host=False, reps=40, warmup=5):
    """Median ms around fwd + autograd.grad (CUDA events; wall clock on the CPU). hide_host=True first
    queues a ~3 ms GPU sleep: the events then measure GPU time only."""
    if not bench.cuda:
        reps, warmup = 2, 0
    times = []
    for i in range(warmup + reps):
        leaves, copies = fresh(qp, kp)
        g1, g2 = gq.clone(), gk.clone()  # fastkern's backward rotates its incoming gradients in place
        if bench.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if hide_host:
                torch.cuda._sleep(6_000_000)
            start.record()
            fwd_bwd(fn, leaves, copies, cos, sin, g1, g2)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fwd_bwd(fn, leaves, copies, cos, sin, g1, g2)
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def run(bench):
    impls = implementations(bench.cuda)
    for s in TINY if bench.tiny else SHAPES:
        qp, kp, cos, sin, gq, gk = make_inputs(**s, dtype=bench.dtype, device=bench.device)
        fwd_bytes = 2 * (qp.numel() + kp.numel()) * qp.element_size() + 2 * cos.numel() * cos.element_size()
        for name, fn in impls.items():
            try:
                err = check(fn, qp, kp, cos, sin, gq, gk)
            except Exception as exc:  # a peer that rejects the layout is reported, not hidden
                bench.add("rope", "fwd+bwd", label(s), name, error=describe(exc))
                continue
            if not err < 2e-2:
                bench.add("rope", "fwd+bwd", label(s), name, error=f"wrong result: relative error {err:.2e}")
                continue
            qw, kw = qp.clone().transpose(1, 2), kp.clone().transpose(1, 2)
            with torch.no_grad():
                fwd = bench.ms(lambda: fn(qw, kw, cos, sin))
            del qw, kw
            bench.add("rope", "fwd", label(s), name, ms=fwd, throughput=fwd_bytes / fwd / 1e6, throughput_unit="GB/s",
                      rel_err=err)
            both = time_fwd_bwd(bench, fn, qp, kp, cos, sin, gq, gk)

            def one():
                leaves, copies = fresh(qp, kp)
                return fwd_bwd(fn, leaves, copies, cos, sin, gq.clone(), gk.clone())

            bench.add("rope", "fwd+bwd", label(s), name, ms=both, throughput=2 * fwd_bytes / both / 1e6,
                      throughput_unit="GB/s", peak_mib=bench.peak_mib(one), rel_err=err)
            if bench.cuda:
                gpu = time_fwd_bwd(bench, fn, qp, kp, cos, sin, gq, gk, hide_host=True)
                bench.add("rope", "fwd+bwd GPU-only", label(s), name, ms=gpu, throughput=2 * fwd_bytes / gpu / 1e6,
                          throughput_unit="GB/s")
        bench.empty_cache()
    host(bench, impls)


def host(bench, impls):
    """Host time of a tiny fwd+bwd (no sync): what the host needs to issue it."""
    qp, kp, cos, sin, gq, gk = make_inputs(**HOST_SHAPE, dtype=bench.dtype, device=bench.device)
    leaves, _ = fresh(qp, kp)
    for name, fn in impls.items():
        if name.startswith("torch.compile"):
            continue

        def step():
            q, k = leaves[0].clone(), leaves[1].clone()
            return fwd_bwd(fn, leaves, (q, k), cos, sin, gq.clone(), gk.clone())

        try:
            bench.add("rope", "fwd+bwd host (no sync)", label(HOST_SHAPE), name, ms=bench.host_ms(step))
        except Exception as exc:
            bench.add("rope", "fwd+bwd host (no sync)", label(HOST_SHAPE), name, error=describe(exc))
