"""Host (Python + dispatcher) time per LoRA-layer forward+backward, measured on CPU with tiny shapes.

    python3 bench/host_lora.py

With M=4, K=32, N=48, r=4 the arithmetic is negligible, so the time per step is what the host
spends issuing the work: the number the GPU cannot hide at small M. Rows:

* ``lora_linear`` dense / NF4 (fastkern's PyTorch reference path, so no Triton interpreter), vs the
  same math as plain eager PyTorch (``x @ W.T + s * (x @ A.T) @ B.T``); the NF4 rows include two
  reference dequantizations (a dozen small PyTorch ops each, where the GPU runs one Triton launch),
  so ``nf4_dequantize`` alone is timed too;
* a PEFT ``lora.Linear`` over nn.Linear: PEFT's own forward vs fastkern's patched forward;
* a PEFT LoRA layer over a bitsandbytes nf4 ``Linear4bit`` (if bitsandbytes is installed).

Each row: best of 5 repeats of the mean over 300 steps (after 50 warm-up steps), in microseconds.
"""

import time

import torch
import torch.nn as nn

import fastkern
from fastkern import runtime
from fastkern.ops import lora_linear, nf4_dequantize, nf4_quantize

M, K, N, R = 4, 32, 48, 4
STEPS, WARMUP, REPEATS = 300, 50, 5


def _time(step) -> float:
    for _ in range(WARMUP):
        step()
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            step()
        best = min(best, (time.perf_counter() - t0) / STEPS)
    return best * 1e6


def _ops_rows() -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K)
    a = torch.randn(R, K, requires_grad=True)
    b = torch.randn(N, R, requires_grad=True)
    packed, state = nf4_quantize(w)
    g = torch.randn(M, N)

    def eager():
        (x @ w.T + 2.0 * ((x @ a.T) @ b.T)).backward(g)

    def dense():
        lora_linear(x, w, a, b, 2.0).backward(g)

    def nf4():
        lora_linear(x, packed, a, b, 2.0, quant_state=state).backward(g)

    def dequant():
        nf4_dequantize(packed, state)

    with runtime.force_reference():
        return {"eager torch (same math)": _time(eager), "fastkern lora_linear dense": _time(dense),
                "fastkern lora_linear nf4": _time(nf4), "fastkern nf4_dequantize alone (1 of the 2 per step)":
                _time(dequant)}


def _peft_rows(base: nn.Module, label: str) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    # patch_model patches transformers models: the layer under test is the q_proj of a one-layer Llama
    # (only that projection is timed; the attention around it never runs).
    holder = LlamaForCausalLM(LlamaConfig(hidden_size=K, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    holder.model.layers[0].self_attn.q_proj = base
    cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["q_proj"], lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(holder, cfg)
    model.train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(M, K, requires_grad=True)
    g = torch.randn(M, N)

    def step():
        layer(x).backward(g)

    rows = {f"peft {label}: PEFT forward": _time(step)}
    report = fastkern.patch_model(model, lora=True, mlp=False, rope=False, packing=False)
    assert report.patched_names("lora"), str(report)
    with runtime.force_reference():
        rows[f"peft {label}: fastkern patched"] = _time(step)
    fastkern.unpatch_model(model)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    rows = _ops_rows()
    try:
        import peft  # noqa: F401
    except ImportError:
        print("peft not installed")
    else:
        torch.manual_seed(0)
        rows.update(_peft_rows(nn.Linear(K, N), "lora.Linear over nn.Linear"))
        try:
            import bitsandbytes as bnb
        except ImportError:
            print("bitsandbytes not installed")
        else:
            q = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(torch.randn(N, K), requires_grad=False, quant_type="nf4")
            rows.update(_peft_rows(q.to("cpu"), "over bnb nf4 Linear4bit"))
    print(f"host time per forward+backward, M={M} K={K} N={N} r={R}, CPU, best of {REPEATS} x {STEPS} steps")
    print("| path | us/step |\n|---|---|")
    for name, us in rows.items():
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
