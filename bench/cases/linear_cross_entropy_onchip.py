"""Linear cross-entropy fwd+bwd: fastkern impl="chunked" vs impl="onchip" vs Liger vs CCE; log-probs +
entropy (GRPO): fastkern chunked vs onchip vs TRL's ChunkedLogProbFunction.

bf16, H4096, no ignored labels: N 8192 and 32768 at V128256, N 8192 at V151936 (Qwen) and 262144
(Gemma 3), lm_head trainable and frozen. Each implementation is first checked against fastkern's
chunked path (loss within 1e-3, gradients within 2e-2 relative norm) and only timed if it agrees. The
on-chip kernels autotune on their first call per (V, H, gradient set): the check step absorbs that.
"""

import torch

import fastkern
from measure import describe, rel_err

H = 4096
PLAN = [(8192, 128256, "loss"), (32768, 128256, "loss"), (8192, 128256, "logprobs"), (8192, 151936, "loss"),
        (8192, 262144, "loss")]
TINY_H, TINY = 32, [(16, 100, "loss"), (16, 100, "logprobs")]


def loss_impls():
    out = {"fastkern chunked": lambda h, w, y: fastkern.ops.fused_linear_cross_entropy(h, w, y, impl="chunked"),
           "fastkern onchip": lambda h, w, y: fastkern.ops.fused_linear_cross_entropy(h, w, y, impl="onchip")}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["Liger FLCE"] = lambda h, w, y: liger(w, h, y)
    except Exception as exc:
        print(f"liger_kernel: not importable ({type(exc).__name__})")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["CCE"] = lambda h, w, y: cce(h, w, y)
    except Exception as exc:
        print(f"cut_cross_entropy: not importable ({type(exc).__name__})")
    return out


def logprob_impls():
    def fk(impl):
        def f(h, w, y):
            lp, ent = fastkern.ops.fused_linear_logprobs(h, w, y, return_entropy=True, impl=impl)
            return -lp.mean() - 0.01 * ent.mean()
        return f

    out = {"fastkern chunked logprobs+entropy": fk("chunked"), "fastkern onchip logprobs+entropy": fk("onchip")}
    try:
        from trl.kernels import ChunkedLogProbFunction

        def trl_fn(h, w, y):
            lp, ent = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ("entropy",))[:2]
            return -lp.mean() - 0.01 * ent.mean()

        out["TRL logprobs+entropy"] = trl_fn
    except Exception as exc:
        print(f"trl: not importable ({type(exc).__name__})")
    return out


def step(fn, h, w, y):
    h.grad = w.grad = None
    loss = fn(h, w, y)
    loss.backward()
    return loss


def result(fn, h, w, y):
    loss = step(fn, h, w, y).detach().float()
    out = (loss, h.grad, w.grad)
    h.grad = w.grad = None
    return out


def run(bench):
    hidden = TINY_H if bench.tiny else H
    for n, v, what in TINY if bench.tiny else PLAN:
        impls = loss_impls() if what == "loss" else logprob_impls()
        for trainable in (True, False):
            shape = f"N{n} H{hidden} V{v} {'trainable' if trainable else 'frozen'}"
            torch.manual_seed(0)
            h = (torch.randn(n, hidden, device=bench.device) * 0.5).to(bench.dtype).requires_grad_()
            w = (torch.randn(v, hidden, device=bench.device) / 64).to(bench.dtype).requires_grad_(trainable)
            y = torch.randint(0, v, (n,), device=bench.device)
            names = list(impls)
            ref = result(impls[names[0]], h, w, y)  # the chunked path is the reference
            flops = (3 if trainable else 2) * 2 * n * hidden * v
            for name in names:
                case = f"{what} fwd+bwd (vs chunked)"
                try:
                    got = result(impls[name], h, w, y)
                    errs = [rel_err(got[0], ref[0])] + [rel_err(g, r) for g, r in zip(got[1:], ref[1:])
                                                         if g is not None and r is not None]
                    if errs[0] > 1e-3 or any(e > 2e-2 for e in errs[1:]):
                        bench.add("linear_cross_entropy", case, shape, name,
                                  error="wrong result: errors " + ", ".join(f"{e:.1e}" for e in errs))
                        continue
                    peak = bench.peak_mib(lambda: step(impls[name], h, w, y))
                    rep = 300 if n <= 8192 else 600
                    ms = bench.ms(lambda: step(impls[name], h, w, y), warmup=2 * rep // 5, rep=rep)
                except Exception as exc:  # out of memory, or a peer that cannot run this configuration
                    bench.add("linear_cross_entropy", case, shape, name, error=describe(exc, 120))
                    continue
                finally:
                    h.grad = w.grad = None
                    bench.empty_cache()
                bench.add("linear_cross_entropy", case, shape, name, ms=ms, peak_mib=peak, throughput=flops / ms / 1e9,
                          throughput_unit="TFLOP/s", rel_err=max(errs))
            del h, w, y, ref
            bench.empty_cache()
