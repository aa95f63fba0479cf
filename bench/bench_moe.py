"""Routed-experts layer, fwd+bwd time and peak memory: fastkern.ops.moe_experts vs transformers' experts
forward (eager per-expert loop, and its grouped_mm implementation), and Liger's MoE if liger_kernel has one.

Shapes (bf16, 8K tokens): Qwen3-30B-A3B (H 2048, 128 experts, top-8, I 768) and Mixtral-8x7B (H 4096,
8 experts, top-2, I 14336). Routing: softmax top-k of random router logits (fixed seed), so every impl
sees the same tokens per expert. Prints one JSON line per (shape, impl).

    python bench/bench_moe.py            # on a GPU
    python bench/bench_moe.py --tiny     # CPU smoke run (tests/test_bench_moe.py): tiny shapes, 1 iteration
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {
    "qwen3_30b_a3b": dict(family="qwen3_moe", hidden=2048, experts=128, top_k=8, inter=768),
    "mixtral_8x7b": dict(family="mixtral", hidden=4096, experts=8, top_k=2, inter=14336),
}
TINY = {
    "qwen3_30b_a3b": dict(family="qwen3_moe", hidden=32, experts=8, top_k=4, inter=16),
    "mixtral_8x7b": dict(family="mixtral", hidden=48, experts=4, top_k=2, inter=32),
}


def _experts_module(shape: dict, implementation: str, dtype, device):
    import transformers

    if shape["family"] == "mixtral":
        config = transformers.MixtralConfig(hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                                            num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls
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
    return module


def _liger_forward():
    """Liger's MoE experts function if the installed liger_kernel exposes one, else None."""
    try:
        import liger_kernel.transformers as lk
    except Exception:
        return None
    for name in ("LigerMoEExperts", "liger_moe_experts", "LigerExperts"):
        if hasattr(lk, name):
            return getattr(lk, name)
    return None


def _impls(shape, dtype, device):
    from fastkern.ops.moe_experts import moe_experts

    impls = {}
    for impl in ("eager", "grouped_mm"):
        impls[f"transformers_{impl}"] = _experts_module(shape, impl, dtype, device)
    fk = _experts_module(shape, "eager", dtype, device)
    impls["fastkern"] = (fk, lambda x, ids, w, m=fk: moe_experts(x, ids, w, m.gate_up_proj, m.down_proj))
    if _liger_forward() is None:
        print(json.dumps({"impl": "liger", "skipped": "liger_kernel has no MoE experts function installed"}))
    return impls


def bench(name: str, shape: dict, tokens: int, iters: int, dtype, device) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(1)
    x0 = torch.randn(tokens, shape["hidden"], generator=g).to(device=device, dtype=dtype)
    logits = torch.randn(tokens, shape["experts"], generator=g).to(device)
    w0, ids = torch.topk(torch.softmax(logits, -1), shape["top_k"], dim=-1)
    w0 = (w0 / w0.sum(-1, keepdim=True)).to(dtype)
    grad = torch.randn(tokens, shape["hidden"], generator=g).to(device=device, dtype=dtype)
    rows = []
    for impl, entry in _impls(shape, dtype, device).items():
        module, fn = entry if isinstance(entry, tuple) else (entry, entry)

        def step():
            x = x0.detach().requires_grad_()
            w = w0.detach().requires_grad_()
            fn(x, ids, w).backward(grad)
            module.zero_grad(set_to_none=True)

        try:
            step()  # warm-up (Triton compiles here)
        except Exception as exc:  # e.g. grouped_mm without a kernel for this device/dtype
            rows.append({"shape": name, "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3 / iters
        row = {"shape": name, "impl": impl, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
               "fwd_bwd_ms": round(ms, 3), "device": device, **{k: v for k, v in shape.items() if k != "family"}}
        if device == "cuda":
            row["peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 1 iteration (CPU smoke run)")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    shapes = TINY if args.tiny else SHAPES
    tokens = args.tokens or (24 if args.tiny else 8192)
    iters = 1 if args.tiny else args.iters
    dtype = torch.bfloat16
    rows = []
    for name, shape in shapes.items():
        for row in bench(name, shape, tokens, iters, dtype, device):
            print(json.dumps(row))
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
