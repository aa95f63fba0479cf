"""Rotary embedding of q and k side by side on one GPU: fastkern vs transformers eager vs torch.compile vs Liger.

    python3 bench/bench_rope.py --out DIR

q and k are transposed views [B, H, T, D] of [B, T, H, D] projection outputs (bf16) and cos/sin are
[B, T, D] as transformers' rotary embedding returns them. Each implementation is checked first at
the bench shape against an fp32 computation (outputs and gradients; a wrong row is not timed).

What is timed:
* fwd: one call under torch.no_grad, triton.testing.do_bench (median). fastkern rotates in place,
  so it rotates the same buffers again on every repetition (a rotation keeps values bounded).
* fwd+bwd: the forward call with autograd on, then torch.autograd.grad of (q_rot, k_rot) with
  respect to (q, k) given fixed upstream gradients, timed with CUDA events around exactly those two
  steps. q and k are fresh non-leaf copies of leaf tensors, made outside the timed region (an
  in-place op cannot rerun on its own output), for every implementation alike; gradients are taken
  with respect to the leaves (clone's backward is free). The copy also evicts L2. Median of the
  repetitions.
* fwd+bwd GPU-only: the same region with a GPU sleep queued first, so host overhead is hidden and
  the events time only the kernels (see time_fwd_bwd).
* peak extra MiB: torch.cuda.max_memory_allocated during one fwd+bwd minus what was allocated
  before it (inputs and upstream gradients excluded).
Bandwidth counts the fewest bytes: fwd reads and writes q and k once and reads cos and sin; fwd+bwd
twice that. Copy bandwidth of the H100 used for the percentage: 3.0 TB/s (measured device-to-device copy).
"""

import argparse
import importlib
import json
import os
import statistics

import torch

SHAPES = [dict(b=4, t=4096, hq=32, hk=8, d=128), dict(b=1, t=65536, hq=32, hk=8, d=128)]
COPY_TBPS = 3.0
DTYPE = torch.bfloat16


def implementations():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    import fastkern

    impls = {
        "fastkern (in place)": lambda q, k, c, s: fastkern.ops.rope(q, k, c, s),
        "fastkern (out of place)": lambda q, k, c, s: fastkern.ops.rope(q, k, c, s, inplace=False),
        "transformers eager": apply_rotary_pos_emb,
        "torch.compile(transformers)": torch.compile(apply_rotary_pos_emb),
    }
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        impls["liger_kernel"] = liger_rotary_pos_emb
    except ImportError as exc:
        print(f"liger_kernel: not installed ({exc})")
    return impls


def make_inputs(b, t, hq, hk, d):
    torch.manual_seed(0)
    qp = torch.randn(b, t, hq, d, device="cuda", dtype=DTYPE)
    kp = torch.randn(b, t, hk, d, device="cuda", dtype=DTYPE)
    inv_freq = 500000.0 ** (-torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d)
    f = torch.arange(t, device="cuda", dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat([f, f], -1)[None].expand(b, -1, -1)
    cos, sin = emb.cos().to(DTYPE).contiguous(), emb.sin().to(DTYPE).contiguous()
    # Upstream gradients in the layout SDPA's backward returns for transposed-view q/k: [B, T, H, D] memory.
    gq = torch.randn(b, t, hq, d, device="cuda", dtype=DTYPE).transpose(1, 2)
    gk = torch.randn(b, t, hk, d, device="cuda", dtype=DTYPE).transpose(1, 2)
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


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(fn, qp, kp, cos, sin, gq, gk):
    """Max relative error of q_rot, k_rot, dq, dk against fp32 math."""
    def rotate(x, c, s):
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * c[:, None] + rot * s[:, None]

    c32, s32 = cos.float(), sin.float()
    errs = []
    for x, g, name in ((qp, gq, "q"), (kp, gk, "k")):
        want = rotate(x.float().transpose(1, 2), c32, s32)
        want_grad = rotate(g.float(), c32, -s32)
        errs.append((name, want, want_grad))
    leaves, (q, k) = fresh(qp, kp)
    q_rot, k_rot = fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    got = [q_rot.detach().clone(), k_rot.detach().clone()]
    dq, dk = torch.autograd.grad((q_rot, k_rot), leaves, (gq.clone(), gk.clone()))
    dq, dk = dq.transpose(1, 2), dk.transpose(1, 2)
    worst = 0.0
    for (name, want, want_grad), out, grad in zip(errs, got, (dq, dk)):
        worst = max(worst, rel_err(out, want), rel_err(grad, want_grad))
    return worst


def time_fwd_bwd(fn, qp, kp, cos, sin, gq, gk, hide_host=False, reps=40, warmup=5):
    """Median ms between CUDA events around fwd + autograd.grad. hide_host=True first queues a ~3 ms
    GPU sleep, so the host enqueues the whole region before the GPU reaches it: the events then
    measure GPU time only (what the op costs inside a training step whose host runs ahead)."""
    times = []
    for i in range(warmup + reps):
        leaves, copies = fresh(qp, kp)
        g1, g2 = gq.clone(), gk.clone()  # fastkern's backward rotates its incoming gradients in place
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if hide_host:
            torch.cuda._sleep(6_000_000)
        start.record()
        grads = fwd_bwd(fn, leaves, copies, cos, sin, g1, g2)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
        del grads, leaves, copies
    return statistics.median(times)


def peak_extra_mib(fn, qp, kp, cos, sin, gq, gk):
    leaves, copies = fresh(qp, kp)
    g1, g2 = gq.clone(), gk.clone()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = fwd_bwd(fn, leaves, copies, cos, sin, g1, g2)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del grads
    return peak / 2**20


def bench_shape(shape, impls):
    from triton.testing import do_bench

    qp, kp, cos, sin, gq, gk = make_inputs(**shape)
    qk_bytes = (qp.numel() + kp.numel()) * qp.element_size()
    fwd_bytes = 2 * qk_bytes + 2 * cos.numel() * cos.element_size()
    rows = []
    for name, fn in impls.items():
        row = dict(shape=shape, impl=name)
        try:
            err = check(fn, qp, kp, cos, sin, gq, gk)
        except Exception as exc:  # a peer that rejects the layout is reported, not hidden
            row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            rows.append(row)
            print(row, flush=True)
            continue
        row["rel_err"] = err
        if not err < 2e-2:
            row["error"] = f"wrong result: relative error {err:.2e}"
            rows.append(row)
            print(row, flush=True)
            continue
        qw, kw = qp.clone().transpose(1, 2), kp.clone().transpose(1, 2)
        with torch.no_grad():
            fwd_ms = do_bench(lambda: fn(qw, kw, cos, sin), warmup=25, rep=100, return_mode="median")
        del qw, kw
        both_ms = time_fwd_bwd(fn, qp, kp, cos, sin, gq, gk)
        gpu_ms = time_fwd_bwd(fn, qp, kp, cos, sin, gq, gk, hide_host=True)
        row.update(fwd_ms=fwd_ms, fwd_tbps=fwd_bytes / fwd_ms / 1e9, fwd_bwd_ms=both_ms,
                   fwd_bwd_tbps=2 * fwd_bytes / both_ms / 1e9, fwd_bwd_gpu_ms=gpu_ms,
                   fwd_bwd_gpu_tbps=2 * fwd_bytes / gpu_ms / 1e9, peak_extra_mib=peak_extra_mib(fn, qp, kp, cos, sin, gq, gk),
                   roofline_fwd_ms=fwd_bytes / (COPY_TBPS * 1e9), roofline_fwd_bwd_ms=2 * fwd_bytes / (COPY_TBPS * 1e9))
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


def sweep(shape):
    """Kernel-only launch-config sweep (in-place forward launch, no autograd)."""
    from triton.testing import do_bench

    rope_ops = importlib.import_module("fastkern.ops.rope")
    qp, kp, cos, sin, _, _ = make_inputs(**shape)
    q, k = qp.transpose(1, 2), kp.transpose(1, 2)
    fwd_bytes = 2 * (qp.numel() + kp.numel()) * 2 + 2 * cos.numel() * 2
    rows = []
    default = rope_ops.launch_config(shape["hq"], shape["d"] // 2)
    for heads_fastest in (True, False):
        for block_t in (1, 2, 4):
            for block_h in (8, 16, 32):
                for warps in (4, 8):
                    ms = do_bench(lambda: rope_ops._launch(q, k, q, k, cos, sin, None, False, False, block_h, warps,
                                                           block_t, heads_fastest),
                                  warmup=10, rep=40, return_mode="median")
                    config = (block_t, block_h, warps, heads_fastest)
                    rows.append(dict(sweep=True, shape=shape, block_t=block_t, block_h=block_h, warps=warps,
                                     heads_fastest=heads_fastest, fwd_ms=ms, fwd_tbps=fwd_bytes / ms / 1e9,
                                     default=config == (default[0], default[1], default[3], default[4])))
    return rows


def best_config_rows(shape, sweep_rows, impls):
    """fwd and fwd+bwd of the in-place op with the sweep's best config for this shape (a tuning
    experiment: launch_config is replaced for these rows only)."""
    rope_ops = importlib.import_module("fastkern.ops.rope")
    best = min((r for r in sweep_rows if r["shape"] == shape), key=lambda r: r["fwd_ms"])
    original = rope_ops.launch_config

    def tuned(n_heads, half_rotary):
        block_r = original(n_heads, half_rotary)[2]
        return best["block_t"], best["block_h"], block_r, best["warps"], best["heads_fastest"]

    rope_ops.launch_config = tuned
    try:
        order = "heads fastest" if best["heads_fastest"] else "tokens fastest"
        name = f"fastkern (in place, BLOCK_T={best['block_t']} BLOCK_H={best['block_h']} warps={best['warps']}, {order})"
        return bench_shape(shape, {name: impls["fastkern (in place)"]})
    finally:
        rope_ops.launch_config = original


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    args = parser.parse_args()
    impls = implementations()
    results = []
    for shape in SHAPES:
        results += bench_shape(shape, impls)
        torch.cuda.empty_cache()
    if args.sweep:
        for shape in SHAPES:
            rows = sweep(shape)
            results += rows + best_config_rows(shape, rows, impls)
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_rope.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_tbps=COPY_TBPS,
                       results=results), f, indent=1)
    print("\n| shape | impl | fwd ms | fwd TB/s (% copy) | fwd+bwd ms | fwd+bwd TB/s (% copy) |"
          " fwd+bwd GPU-only ms | GPU-only TB/s (% copy) | peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["shape"]
        label = f"B{s['b']} T{s['t']} Hq{s['hq']} Hk{s['hk']} D{s['d']}"
        if r.get("sweep"):
            continue
        if "fwd_ms" in r:
            print(f"| {label} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_tbps']:.2f} ({100 * r['fwd_tbps'] / COPY_TBPS:.0f}%)"
                  f" | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tbps']:.2f} ({100 * r['fwd_bwd_tbps'] / COPY_TBPS:.0f}%)"
                  f" | {r['fwd_bwd_gpu_ms']:.3f} | {r['fwd_bwd_gpu_tbps']:.2f}"
                  f" ({100 * r['fwd_bwd_gpu_tbps'] / COPY_TBPS:.0f}%) | {r['peak_extra_mib']:.0f} |")
        else:
            print(f"| {label} | {r['impl']} | {r['error']} | | | | | | |")
    sweeps = [r for r in results if r.get("sweep")]
    if sweeps:
        print("\nkernel-only fwd sweep (ms): shape, BLOCK_T, BLOCK_H, warps, program order")
        for r in sorted(sweeps, key=lambda r: (r["shape"]["t"], r["fwd_ms"])):
            order = "heads" if r["heads_fastest"] else "tokens"
            print(f"  T{r['shape']['t']} BLOCK_T={r['block_t']} BLOCK_H={r['block_h']:<2} warps={r['warps']} {order:<6}"
                  f" {r['fwd_ms']:.4f} ms {r['fwd_tbps']:.2f} TB/s{'  (default)' if r['default'] else ''}")


if __name__ == "__main__":
    main()
