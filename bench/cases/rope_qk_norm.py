"""q_norm/k_norm + rope (Qwen3 attention): fastkern fused vs fastkern unfused vs transformers eager vs torch.compile.

q [B, T, Hq, D] and k [B, T, Hk, D] are the per-head views of separate q/k projections (Qwen3), the
norms are the llama form (Qwen3RMSNorm) with trainable or frozen weights, cos/sin [B, T, D] as
transformers' rotary embedding returns them. Every implementation returns (q, k) as [B, H, T, D] for
attention and is checked first at the bench shape against the function computed in fp32 (outputs, and
gradients of q, k and the weights):

* fastkern rope_qk_norm: one launch forward, one backward (plus the sum of the weight-gradient partials);
* fastkern rms_norm + rope: what the patched model ran before the fused op: two rms_norm launches, then
  rope in place on their outputs (three launches each way);
* transformers eager: Qwen3RMSNorm's math and apply_rotary_pos_emb; and torch.compile of it (CUDA only).

Cases: fwd (no_grad, do_bench), fwd+bwd (forward, then autograd.grad with fixed upstream gradients),
fwd+bwd GPU (CUDA graph: host time taken out), and a host-time row at a tiny shape. ``extra.saved_mib``:
what autograd keeps for backward beyond the inputs. Bytes that must move: fwd reads q, k (and cos, sin)
and writes q_out, k_out; fwd+bwd adds reading q, k, dq_out, dk_out and writing dq, dk.
"""

import torch

import fastkern
from measure import describe, rel_err, saved_bytes

EPS = 1e-6
# Qwen3-0.6B (hidden 1024: 16 q heads, 8 kv heads of 128) and Qwen3-8B (32 / 8 heads of 128), 2 x 4096 tokens.
SHAPES = [dict(name="qwen3-0.6b", b=2, t=4096, hq=16, hk=8, d=128),
          dict(name="qwen3-8b", b=2, t=4096, hq=32, hk=8, d=128)]
TINY = [dict(name="tiny", b=1, t=8, hq=4, hk=2, d=16)]
HOST_SHAPE = dict(name="host", b=1, t=16, hq=4, hk=2, d=64)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _eager(q, k, wq, wk, cos, sin):
    """Qwen3 attention's q_norm/k_norm, transpose and apply_rotary_pos_emb, in PyTorch."""
    def norm(x, w):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        return w * h.to(x.dtype)

    q, k = norm(q, wq).transpose(1, 2), norm(k, wk).transpose(1, 2)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _fused(q, k, wq, wk, cos, sin):
    q_out, k_out = fastkern.ops.rope_qk_norm(q, k, wq, wk, cos, sin, EPS)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def _unfused(q, k, wq, wk, cos, sin):
    qn, kn = fastkern.ops.rms_norm(q, wq, EPS), fastkern.ops.rms_norm(k, wk, EPS)
    return fastkern.ops.rope(qn.transpose(1, 2), kn.transpose(1, 2), cos, sin)


def implementations(cuda):
    impls = {"fastkern rope_qk_norm": _fused, "fastkern rms_norm + rope": _unfused, "transformers eager": _eager}
    if cuda:
        # A fresh compiled function per shape and weight mode (dynamo's recompile limit, as in rms_norm.py).
        torch._dynamo.reset()
        impls["torch.compile(transformers)"] = torch.compile(_eager, dynamic=False)
    return impls


def label(s):
    return f"{s['name']} B{s['b']} T{s['t']} Hq{s['hq']} Hk{s['hk']} D{s['d']}"


def make_inputs(b, t, hq, hk, d, dtype, device, trainable, name=None):
    torch.manual_seed(0)
    q = torch.randn(b, t, hq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, t, hk, d, device=device, dtype=dtype, requires_grad=True)
    wq, wk = ((torch.randn(d, device=device) * 0.1 + 1.0).to(dtype).requires_grad_(trainable) for _ in "qk")
    inv_freq = 1000000.0 ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    f = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat([f, f], -1)[None].expand(b, -1, -1)
    cos, sin = emb.cos().to(dtype).contiguous(), emb.sin().to(dtype).contiguous()
    # Upstream gradients as SDPA's backward hands them to [B, H, T, D] views of [B, T, H, D] memory.
    gq = torch.randn(b, t, hq, d, device=device, dtype=dtype).transpose(1, 2)
    gk = torch.randn(b, t, hk, d, device=device, dtype=dtype).transpose(1, 2)
    return q, k, wq, wk, cos, sin, gq, gk


def reference(q, k, wq, wk, cos, sin):
    """The function in fp32 (no intermediate rounding), differentiable in its fp32 copies of the inputs."""
    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w

    q, k = norm(q, wq).transpose(1, 2), norm(k, wk).transpose(1, 2)
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def run(bench):
    for s in TINY if bench.tiny else SHAPES:
        for trainable in (True, False):
            one_shape(bench, s, trainable)
            bench.empty_cache()
    host(bench)


def one_shape(bench, s, trainable):
    q, k, wq, wk, cos, sin, gq, gk = make_inputs(**s, dtype=bench.dtype, device=bench.device, trainable=trainable)
    shape = f"{label(s)}, norms {'trainable' if trainable else 'frozen'}"
    wrt = (q, k, wq, wk) if trainable else (q, k)
    leaves32 = [x.detach().float().requires_grad_(x.requires_grad) for x in (q, k, wq, wk)]
    ref = reference(*leaves32, cos, sin)
    ref_grads = torch.autograd.grad(ref, leaves32[:len(wrt)], (gq.float(), gk.float()))
    qk_bytes = (q.numel() + k.numel()) * q.element_size()
    table_bytes = 2 * cos.numel() * cos.element_size()
    fwd_bytes, both_bytes = 2 * qk_bytes + table_bytes, 5 * qk_bytes + 2 * table_bytes
    for name, fn in implementations(bench.cuda).items():
        try:
            out = fn(q, k, wq, wk, cos, sin)
            grads = torch.autograd.grad(out, wrt, (gq, gk))
            err = max(rel_err(a, b) for a, b in zip((*out, *grads), (*ref, *ref_grads)))
            del out, grads  # the check's graph is not kept alive into the timings
            if not err < 2e-2:
                bench.add("rope_qk_norm", "fwd+bwd", shape, name, error=f"wrong result: relative error {err:.2e}")
                continue
            with torch.no_grad():
                fwd = bench.ms(lambda: fn(q, k, wq, wk, cos, sin))
            both = bench.ms(lambda: torch.autograd.grad(fn(q, k, wq, wk, cos, sin), wrt, (gq, gk)))
            # Fresh leaves for the capture (see bench/cases/rms_norm.py: AccumulateGrad nodes made on the
            # default stream and still held would make the captured backward sync with it).
            cap = [x.detach().clone().requires_grad_(x.requires_grad) for x in (q, k, wq, wk)]
            cap_wrt = tuple(cap[:len(wrt)])
            graph = bench.graph_ms(lambda: torch.autograd.grad(fn(*cap, cos, sin), cap_wrt, (gq, gk)), name)
            peak = bench.peak_mib(lambda: torch.autograd.grad(fn(q, k, wq, wk, cos, sin), wrt, (gq, gk)))
            saved = saved_bytes(fn, (q, k, wq, wk, cos, sin)) / 2**20
        except Exception as exc:  # an implementation that fails a case is reported, not fatal
            bench.add("rope_qk_norm", "fwd+bwd", shape, name, error=describe(exc, 200))
            continue
        bench.add("rope_qk_norm", "fwd", shape, name, ms=fwd, throughput=fwd_bytes / fwd / 1e6,
                  throughput_unit="GB/s", rel_err=err)
        bench.add("rope_qk_norm", "fwd+bwd", shape, name, ms=both, throughput=both_bytes / both / 1e6,
                  throughput_unit="GB/s", peak_mib=peak, rel_err=err, saved_mib=saved)
        if graph is not None:
            bench.add("rope_qk_norm", "fwd+bwd GPU (CUDA graph)", shape, name, ms=graph,
                      throughput=both_bytes / graph / 1e6, throughput_unit="GB/s")


def host(bench):
    """Host time of a tiny fwd+bwd (no sync): what the host needs to issue it (launches, autograd nodes)."""
    q, k, wq, wk, cos, sin, gq, gk = make_inputs(**HOST_SHAPE, dtype=bench.dtype, device=bench.device, trainable=True)
    for name, fn in implementations(False).items():  # torch.compile has its own host path: not compared here

        def step():
            return torch.autograd.grad(fn(q, k, wq, wk, cos, sin), (q, k, wq, wk), (gq, gk))

        try:
            bench.add("rope_qk_norm", "fwd+bwd host (no sync)", label(HOST_SHAPE), name, ms=bench.host_ms(step))
        except Exception as exc:
            bench.add("rope_qk_norm", "fwd+bwd host (no sync)", label(HOST_SHAPE), name, error=describe(exc))
