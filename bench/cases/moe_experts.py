"""Routed-experts layer, fwd+bwd: fastkern.ops.moe_experts vs transformers' experts forward (its eager
per-expert loop and its grouped_mm implementation), and Liger's MoE experts where liger_kernel has one.

Shapes (8K tokens): Qwen3-30B-A3B (H 2048, 128 experts, top-8, I 768), Mixtral-8x7B (H 4096, 8
experts, top-2, I 14336) and gpt-oss-20b (H 2880, 32 experts, top-4, I 2880; interleaved gate/up,
transposed weights, biases, clamped SwiGLU), and the Qwen3 layer with LoRA r16 on both expert weights
(frozen experts, PEFT's ``target_parameters`` math: the adapted weight W + s B A per call, read by every
implementation through a parametrization; gradients for A and B). Routing: softmax top-k of random router logits (fixed
seed), so every implementation sees the same tokens per expert. Each implementation is checked first
against the eager experts forward in fp32 with the same weights: output and the gradients of the
hidden states, the routing weights and every trainable parameter (expert weights and biases, or the
LoRA factors) within 2e-2
relative error norm. Rows: fwd+bwd (median) with the peak extra memory; throughput counts the expert
GEMMs (3 GEMMs of 2·N·k·H·I forward, twice that backward).

    python bench/run.py --ops moe_experts --out DIR                       # GPU, bf16
    python bench/run.py --ops moe_experts --tiny --device cpu --out DIR   # tiny shapes, fp32 (tests run this)
"""

import torch

from measure import describe, rel_err

SHAPES = {
    "qwen3_30b_a3b": dict(family="qwen3_moe", hidden=2048, experts=128, top_k=8, inter=768, tokens=8192),
    "mixtral_8x7b": dict(family="mixtral", hidden=4096, experts=8, top_k=2, inter=14336, tokens=8192),
    "gpt_oss_20b": dict(family="gpt_oss", hidden=2880, experts=32, top_k=4, inter=2880, tokens=8192),
    "qwen3_30b_a3b_lora_r16": dict(family="qwen3_moe", hidden=2048, experts=128, top_k=8, inter=768, tokens=8192,
                                   lora=16),
}
TINY = {
    "qwen3_30b_a3b": dict(family="qwen3_moe", hidden=32, experts=8, top_k=4, inter=16, tokens=24),
    "mixtral_8x7b": dict(family="mixtral", hidden=48, experts=4, top_k=2, inter=32, tokens=24),
    "gpt_oss_20b": dict(family="gpt_oss", hidden=32, experts=4, top_k=2, inter=16, tokens=24),
    "qwen3_30b_a3b_lora_r16": dict(family="qwen3_moe", hidden=32, experts=8, top_k=4, inter=16, tokens=24, lora=4),
}
TOLERANCE = 2e-2


def experts_module(shape: dict, implementation: str, dtype, device):
    """transformers' experts module of the family, weights from a fixed seed (the same for every impl)."""
    import transformers

    if shape["family"] == "mixtral":
        config = transformers.MixtralConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                                            num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls
    elif shape["family"] == "gpt_oss":
        config = transformers.GptOssConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                                           num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls
    else:
        config = transformers.Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["inter"],
                                             num_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls
    config._experts_implementation = implementation
    module = cls(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        g = torch.Generator(device="cpu").manual_seed(0)
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    if shape.get("lora"):
        _add_expert_lora(module, shape["lora"], g)
    return module


class ExpertLoRA(torch.nn.Module):
    """LoRA on a stacked expert weight [E, out, in] as PEFT's ``target_parameters`` applies it (one
    baddbmm per call: W + scaling * B @ A per expert), as a parametrization: every implementation reads
    the adapted weight from the module, and the gradients reach A and B through it."""

    def __init__(self, weight: torch.Tensor, rank: int, g: torch.Generator):
        super().__init__()
        e, n_out, n_in = weight.shape
        self.a = torch.nn.Parameter((torch.randn(e, rank, n_in, generator=g) / n_in ** 0.5).to(weight))
        self.b = torch.nn.Parameter((torch.randn(e, n_out, rank, generator=g) / rank ** 0.5).to(weight))
        self.scaling = 2.0

    def forward(self, weight):
        return torch.baddbmm(weight, self.b, self.a, alpha=self.scaling)


def _add_expert_lora(module, rank: int, g: torch.Generator) -> None:
    """Frozen experts with LoRA on gate_up_proj and down_proj (Qwen3-MoE layout [E, out, in])."""
    from torch.nn.utils import parametrize

    for p in module.parameters():
        p.requires_grad_(False)
    for name in ("gate_up_proj", "down_proj"):
        parametrize.register_parametrization(module, name, ExpertLoRA(getattr(module, name), rank, g))


def liger_experts():
    """Liger's MoE experts function if the installed liger_kernel exposes one, else None."""
    try:
        import liger_kernel.transformers as lk
    except Exception:
        return None
    return next((getattr(lk, n) for n in ("LigerMoEExperts", "liger_moe_experts", "LigerExperts") if hasattr(lk, n)),
                None)


def implementations(shape, dtype, device):
    """name -> (module holding the expert weights, fn(x, ids, weights) -> out)."""
    from fastkern.ops import moe_experts

    impls = {}
    for impl in ("eager", "grouped_mm"):
        module = experts_module(shape, impl, dtype, device)
        impls[f"transformers {impl}"] = (module, module)
    module = experts_module(shape, "eager", dtype, device)
    if shape["family"] == "gpt_oss":  # the arguments fastkern/patching/moe.py passes for patches/gpt_oss.toml
        impls["fastkern"] = (module, lambda x, ids, w, m=module: moe_experts(
            x, ids, w, m.gate_up_proj.transpose(1, 2), m.down_proj.transpose(1, 2), m.gate_up_proj_bias,
            m.down_proj_bias, interleaved=True, activation="clamped_swiglu", alpha=m.alpha, limit=m.limit))
    else:
        impls["fastkern"] = (module, lambda x, ids, w, m=module: moe_experts(x, ids, w, m.gate_up_proj, m.down_proj))
    return impls


def routing(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    tokens, hidden = shape["tokens"], shape["hidden"]
    x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype)
    logits = torch.randn(tokens, shape["experts"], generator=g).to(device)
    weights, ids = torch.topk(torch.softmax(logits, -1), shape["top_k"], dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    grad = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype)
    return x, ids, weights, grad


def fwd_bwd(module, fn, x0, ids, w0, grad):
    from torch.nn.utils import parametrize

    x, w = x0.detach().requires_grad_(), w0.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    # Adapted weights are computed once per call, as PEFT's ParamWrapper caches them: transformers' eager
    # loop reads ``gate_up_proj[e]`` per expert, and each read of a parametrized weight would otherwise
    # build the whole [E, out, in] adapted tensor again and keep it for backward (128 copies at the
    # Qwen3 shape: out of memory on an 80 GB GPU).
    with parametrize.cached():
        out = fn(x, ids, w)
    out.backward(grad)
    return (out, x.grad, w.grad, *(p.grad for p in module.parameters() if p.requires_grad))


def check(module, fn, reference, inputs) -> float:
    """Largest relative error of the output and the gradients (x, routing weights, every expert parameter)
    against the fp32 eager experts."""
    got = fwd_bwd(module, fn, *inputs)
    x, ids, w, grad = inputs
    ref = fwd_bwd(reference, reference, x.float(), ids, w.float(), grad.float())
    return max(rel_err(a, b) for a, b in zip(got, ref))


def run(bench):
    for name, shape in (TINY if bench.tiny else SHAPES).items():
        text = f"N{shape['tokens']} H{shape['hidden']} E{shape['experts']} top{shape['top_k']} I{shape['inter']} ({name})"
        inputs = routing(shape, bench.dtype, bench.device)
        reference = experts_module(shape, "eager", torch.float32, bench.device)
        flops = 3 * 2 * shape["tokens"] * shape["top_k"] * shape["hidden"] * shape["inter"] * 3  # fwd + 2x bwd
        if liger_experts() is None:
            bench.add("moe_experts", "fwd+bwd", text, "liger", error="liger_kernel has no MoE experts function installed")
        for impl, (module, fn) in implementations(shape, bench.dtype, bench.device).items():
            try:
                err = check(module, fn, reference, inputs)
            except Exception as exc:  # e.g. grouped_mm without a kernel for this device/dtype
                bench.add("moe_experts", "fwd+bwd", text, impl, error=describe(exc))
                del exc
                bench.empty_cache()  # what the failed call allocated is not the next implementation's
                continue
            if not err < TOLERANCE:
                bench.add("moe_experts", "fwd+bwd", text, impl, error=f"wrong result: relative error {err:.2e}")
                continue
            ms = bench.ms(lambda: fwd_bwd(module, fn, *inputs))
            bench.add("moe_experts", "fwd+bwd", text, impl, ms=ms, throughput=flops / ms / 1e9,
                      throughput_unit="TFLOP/s", peak_mib=bench.peak_mib(lambda: fwd_bwd(module, fn, *inputs)),
                      rel_err=err)
            bench.empty_cache()
