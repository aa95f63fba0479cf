"""LoRA layer forward+backward: fastkern (16-bit and NF4 base) vs torch eager / torch.compile of the same
formula vs PEFT vs PEFT + bitsandbytes, and the NF4 layer composed from nf4_matmul (opt-in, in-tile).

Layer 4096 -> 14336, r16, alpha 32, bf16, no bias, base frozen; x requires grad (as inside a model),
M = 512, 2048, 8192 tokens. One step = forward + backward (dX, dA, dB). Each implementation is checked
first against an fp32 computation with the same (dequantized) base weight: output and all three
gradients within 2e-2 relative error norm. Rows: fwd, fwd+bwd (wall), fwd+bwd GPU (CUDA graph); peak
extra memory beyond the inputs, the layer and grad_out; throughput counts the base GEMMs (2·2·M·N·K).
"""

import torch
import torch.nn as nn

from measure import describe, rel_err

FULL = dict(k=4096, n=14336, r=16, ms=(512, 2048, 8192))
TINY = dict(k=32, n=48, r=4, ms=(5,))
ALPHA_OVER_R = 2.0


class _Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj


def _peft_layer(base, r, dtype):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=int(ALPHA_OVER_R * r), target_modules=["proj"], lora_dropout=0.0,
                     init_lora_weights=False)
    layer = get_peft_model(_Holder(base), cfg).base_model.model.proj
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        p.data = p.data.to(dtype)
    return layer


def build(bench, k, n, r):
    """name -> (callable x -> y, lora_A param, lora_B param, dense fp32 weight for the check)."""
    from fastkern.ops import lora_linear, nf4_dequantize, nf4_quantize

    dt, dev, s = bench.dtype, bench.device, ALPHA_OVER_R
    torch.manual_seed(0)
    w = (torch.randn(n, k, device=dev) / k**0.5).to(dt)
    a = nn.Parameter((torch.randn(r, k, device=dev) / k**0.5).to(dt))
    b = nn.Parameter((torch.randn(n, r, device=dev) / r**0.5).to(dt))

    def formula(x, w_, a_, b_):
        return x @ w_.T + s * ((x @ a_.T) @ b_.T)

    impls = {"fastkern 16-bit": (lambda x: lora_linear(x, w, a, b, s), a, b, w.float()),
             "torch eager 16-bit": (lambda x: formula(x, w, a, b), a, b, w.float())}
    if bench.cuda:
        compiled = torch.compile(formula)
        impls["torch.compile 16-bit"] = (lambda x: compiled(x, w, a, b), a, b, w.float())
    try:
        base = nn.Linear(k, n, bias=False, device=dev, dtype=dt)
        base.weight.data.copy_(w)
        base.weight.requires_grad_(False)
        layer = _peft_layer(base, r, dt)
        layer.lora_A["default"].weight.data.copy_(a.data)
        layer.lora_B["default"].weight.data.copy_(b.data)
        impls["peft 16-bit"] = (layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight, w.float())
    except ImportError:
        print("peft: not installed")
    bnb = None
    if bench.cuda:
        try:
            import bitsandbytes as bnb
        except ImportError:
            print("bitsandbytes: not installed; fastkern NF4 uses nf4_quantize")
    if bnb is None:
        packed, state = nf4_quantize(w)
        impls["fastkern nf4"] = (lambda x: lora_linear(x, packed, a, b, s, quant_state=state), a, b,
                                 nf4_dequantize(packed, state).float())
        return impls
    q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dt, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4")
    q = q.cuda()
    packed, state = q.weight.data, q.weight.quant_state
    dense = bnb.functional.dequantize_4bit(packed, state, quant_type="nf4").float()
    impls["fastkern nf4"] = (lambda x: lora_linear(x, packed, a, b, s, quant_state=state), a, b, dense)
    from cases.nf4 import in_tile_matmul

    nf4_matmul = in_tile_matmul()  # fastkern.experimental.nf4_matmul
    if nf4_matmul is not None:
        # W dequantized inside the GEMM tiles, never in 16 bits; not what lora_linear does (docs/nf4_lora.md).
        impls["nf4_matmul composed (in-tile, opt-in)"] = (
            lambda x: nf4_matmul(x, packed, state).addmm_(x @ a.T, b.T, alpha=s), a, b, dense)
    try:
        qlayer = _peft_layer(q, r, dt)
        qlayer.lora_A["default"].weight.data.copy_(a.data)
        qlayer.lora_B["default"].weight.data.copy_(b.data)
        impls["peft+bnb nf4"] = (qlayer, qlayer.lora_A["default"].weight, qlayer.lora_B["default"].weight, dense)
    except ImportError:
        pass
    return impls


def check(fn, a, b, dense, x, dy):
    x = x.detach().clone().requires_grad_()
    a.grad = b.grad = None
    y = fn(x)
    y.backward(dy)
    x32 = x.detach().float().requires_grad_()
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    y32 = x32 @ dense.T + ALPHA_OVER_R * ((x32 @ a32.T) @ b32.T)
    y32.backward(dy.float())
    errs = [rel_err(y, y32), rel_err(x.grad, x32.grad), rel_err(a.grad, a32.grad), rel_err(b.grad, b32.grad)]
    a.grad = b.grad = None
    return max(errs)


def run(bench):
    p = TINY if bench.tiny else FULL
    k, n = p["k"], p["n"]
    impls = build(bench, k, n, p["r"])
    for m in p["ms"]:
        shape = f"M{m} {k}->{n} r{p['r']}"
        x = torch.randn(m, k, device=bench.device, dtype=bench.dtype, requires_grad=True)
        dy = torch.randn(m, n, device=bench.device, dtype=bench.dtype)
        flops = 2 * 2 * m * n * k
        for name, (fn, a, b, dense) in impls.items():
            try:
                err = check(fn, a, b, dense, x, dy)
                if not err < 2e-2:
                    bench.add("lora_linear", "fwd+bwd", shape, name, error=f"wrong result: relative error {err:.2e}")
                    continue

                def step():
                    x.grad = a.grad = b.grad = None
                    fn(x).backward(dy)

                both = bench.ms(step, warmup=10, rep=100)
                graph = bench.graph_ms(step, name)
                with torch.no_grad():
                    fwd = bench.ms(lambda: fn(x), warmup=10, rep=100)
                bench.empty_cache()
                peak = bench.peak_mib(step)
                x.grad = a.grad = b.grad = None
            except Exception as exc:
                bench.add("lora_linear", "fwd+bwd", shape, name, error=describe(exc))
                continue
            bench.add("lora_linear", "fwd", shape, name, ms=fwd, rel_err=err)
            bench.add("lora_linear", "fwd+bwd", shape, name, ms=both, peak_mib=peak, throughput=flops / both / 1e9,
                      throughput_unit="TFLOP/s", rel_err=err)
            if graph is not None:
                bench.add("lora_linear", "fwd+bwd GPU (CUDA graph)", shape, name, ms=graph,
                          throughput=flops / graph / 1e9, throughput_unit="TFLOP/s")
