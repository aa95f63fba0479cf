"""Fused linear cross-entropy and log-probs(+entropy), fwd+bwd: fastkern vs CCE, Liger, TRL's fused head,
eager fp32 logits; and the cuBLAS floor (the same GEMMs alone, in fastkern's chunks).

bf16, H4096, V128256 (also 151936 and 256000 with softcap 30), no ignored labels, lm_head trainable and
frozen. Each row is checked against fp32 logits computed 8192 rows at a time (loss within 1e-3, gradients
within 2e-2 relative norm) before it is timed. Peak extra memory includes the gradients the step returns.
Throughput: GEMM TFLOP/s (3 GEMMs of 2·N·H·V with a trainable head, 2 frozen).
"""

import torch
import torch.nn.functional as F

import fastkern
from measure import describe, rel_err

H, V = 4096, 128256
CONFIGS = [(8192, True, V, None), (8192, False, V, None), (32768, True, V, None), (32768, False, V, None),
           (8192, True, 151936, None), (8192, True, 256000, 30.0)]
TINY_H = 32
TINY = [(16, True, 100, None), (16, False, 100, None), (16, True, 100, 30.0)]


def peers():
    out = {}
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["CCE"] = lambda h, w, y, softcap=None: cce(h, w, y, softcap=softcap)
    except Exception as exc:
        print(f"cut_cross_entropy: not installed ({type(exc).__name__})")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        out["Liger FLCE"] = lambda h, w, y, softcap=None: LigerFusedLinearCrossEntropyLoss(softcap=softcap)(w, h, y)
    except Exception as exc:
        print(f"liger_kernel: not installed ({type(exc).__name__})")
    try:
        from trl.kernels import ChunkedLogProbFunction

        # TRL's fused head calls it with a 32768-wide vocabulary tile; mean of -log p is the same loss.
        out["TRL head"] = lambda h, w, y, softcap=None: -ChunkedLogProbFunction.apply(
            h, w, None, y, 1.0, 32768, softcap, 1.0, ())[0].mean()
    except Exception as exc:
        print(f"trl: not installed ({type(exc).__name__})")
    return out


def eager_fp32(h, w, y, softcap=None):
    z = (h @ w.T).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, y)


def fastkern_ce(chunk=None):
    return lambda h, w, y, softcap=None: fastkern.ops.fused_linear_cross_entropy(h, w, y, softcap=softcap,
                                                                                  chunk_size=chunk)


def step(fn, h, w, y, softcap=None):
    h.grad = w.grad = None
    loss = fn(h, w, y, softcap=softcap)
    loss.backward()
    return loss


def reference(h, w, y, softcap):
    """Loss and grads from fp32 logits, 8192 rows at a time (eager cannot hold N32768 x V in fp32)."""
    n, total = h.shape[0], 0.0
    gh = torch.empty_like(h)
    gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if w.requires_grad else None
    for s in range(0, n, 8192):
        hs = h[s:s + 8192].detach().requires_grad_()
        ws = w.detach().requires_grad_(w.requires_grad)
        z = (hs @ ws.T).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        loss = F.cross_entropy(z, y[s:s + 8192], reduction="sum") / n
        loss.backward()
        total += loss.item()
        gh[s:s + 8192] = hs.grad
        if gw is not None:
            gw += ws.grad.float()
    return torch.tensor(total), gh, gw


def timed(bench, case, shape, name, fn, h, w, y, softcap, ref, flops):
    try:
        loss = step(fn, h, w, y, softcap).detach()
        errs = [rel_err(loss.cpu(), ref[0])] + [rel_err(g, r) for g, r in zip((h.grad, w.grad), ref[1:])
                                                 if g is not None and r is not None]
        if errs[0] > 1e-3 or any(e > 2e-2 for e in errs[1:]):
            bench.add("linear_cross_entropy", case, shape, name, error="wrong result: errors " +
                      ", ".join(f"{e:.1e}" for e in errs))
            return
        h.grad = w.grad = None  # else the check's gradients sit in the baseline and the peak leaves them out
        peak = bench.peak_mib(lambda: step(fn, h, w, y, softcap))
        ms = bench.ms(lambda: step(fn, h, w, y, softcap), warmup=100, rep=600)
    except Exception as exc:  # out of memory, or a peer that cannot run this configuration
        bench.add("linear_cross_entropy", case, shape, name, error=describe(exc, 120))
        return
    finally:
        h.grad = w.grad = None
        bench.empty_cache()
    bench.add("linear_cross_entropy", case, shape, name, ms=ms, peak_mib=peak, throughput=flops / ms / 1e9,
              throughput_unit="TFLOP/s", rel_err=max(errs))


def run(bench):
    hidden = TINY_H if bench.tiny else H
    peer_fns = peers()
    for n, trainable, v, softcap in TINY if bench.tiny else CONFIGS:
        torch.manual_seed(0)
        h = (torch.randn(n, hidden, device=bench.device) * 0.5).to(bench.dtype).requires_grad_()
        w = (torch.randn(v, hidden, device=bench.device) / 64).to(bench.dtype).requires_grad_(trainable)
        y = torch.randint(0, v, (n,), device=bench.device)
        ref = reference(h, w, y, softcap)
        shape = f"N{n} H{hidden} V{v} {'trainable' if trainable else 'frozen'}" + (f" softcap{softcap:g}" if softcap else "")
        flops = (3 if trainable else 2) * 2 * n * hidden * v
        impls = {"fastkern (default chunk)": fastkern_ce()}
        if v == V:
            # Frozen heads default to 512-token chunks; the smallest chunk of each kind is the one that fits
            # the memory target (docs/linear_cross_entropy.md explains the trade-off).
            chunks = (256, 1024, 4096) if trainable else (128, 256, 2048)
            impls.update({f"fastkern chunk={c}": fastkern_ce(c) for c in chunks})
        impls.update(peer_fns)
        if n <= 8192:
            impls["eager fp32 logits"] = eager_fp32
        for name, fn in impls.items():
            timed(bench, "loss fwd+bwd", shape, name, fn, h, w, y, softcap, ref, flops)
        if softcap is None and v in (V, 100):
            gemm_floor(bench, h.detach(), w.detach(), trainable, shape, flops)
        del h, w, y, ref
        bench.empty_cache()
    logprobs(bench, hidden, 16 if bench.tiny else 8192, 100 if bench.tiny else V)


def gemm_floor(bench, h, w, trainable, shape, flops):
    n, v = h.shape[0], w.shape[0]
    rows = fastkern.ops.linear_cross_entropy.chunk_rows(n, v, h.dtype, h.device, 0, weight_grad=trainable)
    z = torch.empty(rows, v, device=h.device, dtype=h.dtype)
    gh, gw = torch.empty_like(h), torch.empty_like(w)

    def gemms():
        for s in range(0, n, rows):
            m = min(rows, n - s)
            torch.mm(h[s:s + m], w.T, out=z[:m])
            torch.mm(z[:m], w, out=gh[s:s + m])
            if trainable:
                gw.addmm_(z[:m].T, h[s:s + m], beta=0.0 if s == 0 else 1.0)

    ms = bench.ms(gemms, warmup=50, rep=400)
    bench.add("linear_cross_entropy", "loss fwd+bwd", shape, "GEMM floor (cuBLAS, fastkern's chunks)", ms=ms,
              throughput=flops / ms / 1e9, throughput_unit="TFLOP/s")


def logprobs(bench, hidden, n, v):
    """fwd+bwd of mean(-logp) - 0.01 * mean(entropy), trainable head: fastkern vs TRL's function."""
    torch.manual_seed(0)
    h = (torch.randn(n, hidden, device=bench.device) * 0.5).to(bench.dtype).requires_grad_()
    w = (torch.randn(v, hidden, device=bench.device) / 64).to(bench.dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device=bench.device)

    def fk(h, w, y, softcap=None):
        lp, ent = fastkern.ops.fused_linear_logprobs(h, w, y, return_entropy=True)
        return -lp.mean() - 0.01 * ent.mean()

    def eager(h, w, y, softcap=None):
        logp = torch.log_softmax((h @ w.T).float(), -1)
        ent = -(logp.exp() * logp).sum(-1)
        return -logp.gather(1, y[:, None]).mean() - 0.01 * ent.mean()

    impls = {"fastkern logprobs+entropy": fk}
    try:
        from trl.kernels import ChunkedLogProbFunction

        def trl_fn(h, w, y, softcap=None):
            lp, ent = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ("entropy",))[:2]
            return -lp.mean() - 0.01 * ent.mean()

        impls["TRL logprobs+entropy"] = trl_fn
    except Exception as exc:
        print(f"trl: not installed ({type(exc).__name__})")
    # Reference: the same loss from fp32 logits, in 8192-row pieces where it fits (n <= 8192 here).
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    loss = eager(h32, w32, y)
    loss.backward()
    ref = (loss.detach().cpu(), h32.grad, w32.grad)
    shape = f"N{n} H{hidden} V{v} trainable"
    for name, fn in impls.items():
        timed(bench, "logprobs+entropy fwd+bwd", shape, name, fn, h, w, y, None, ref, 3 * 2 * n * hidden * v)
