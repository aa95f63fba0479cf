"""Host time of the fused NF4 LoRA path vs PEFT over bitsandbytes, per call, on the GPU host.

    python3 bench/host_qlora_gpu.py

Why: the TRL SFT QLoRA step is host-bound on the lent H200 host (~280 ms wall for ~200 ms of
kernels, docs/nf4_lora.md) and the fused NF4 layers do 12% less GPU work without a wall-clock
gain, so the question is how much more host time a fused NF4 call costs than PEFT's and where.
Layer 2048 -> 8192 (a Llama-1B gate/up projection), r16, bf16, NF4 double quant, M = 512 (host time
does not depend on M; the GPU queue never fills in 20 calls). Rows: mean host microseconds per call,
no synchronization inside the loop. Then a cProfile of 200 fused forward+backward steps by own time.
"""

import cProfile
import pstats

import torch

import fastkern
from fastkern.ops import lora_linear
from fastkern.ops.nf4 import dequantize_into, flatten_state

M, K, N, R = 512, 2048, 8192, 16
DT = torch.bfloat16

try:  # run as a script (bench/ on sys.path) or imported as bench.host_qlora_gpu
    from host_lora_gpu import _host_us
except ImportError:
    from bench.host_lora_gpu import _host_us


def _peft_layer(base):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    # patch_model patches transformers models: the layer under test is a one-layer Llama's gate_proj.
    holder = LlamaForCausalLM(LlamaConfig(hidden_size=K, intermediate_size=N, num_hidden_layers=1,
                                          num_attention_heads=16, num_key_value_heads=8, vocab_size=32))
    holder.model.layers[0].mlp.gate_proj = base
    model = get_peft_model(holder, LoraConfig(r=R, lora_alpha=2 * R, target_modules=["gate_proj"], lora_dropout=0.0))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(DT)  # as SFTTrainer casts adapters of a quantized model
    model.train()
    return model, model.base_model.model.model.layers[0].mlp.gate_proj


def main():
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes {bnb.__version__}")
    w = torch.randn(N, K) / K**0.5
    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DT, quant_type="nf4", compress_statistics=True)
    base.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    base = base.cuda()
    model, layer = _peft_layer(base)
    model.cuda()
    state = base.weight.quant_state
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(M, K, device="cuda", dtype=DT, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=DT)
    flat = flatten_state("probe", base.weight, state, dtype=DT)
    buf = torch.empty(N, K, device="cuda", dtype=DT)
    rows = {}
    rows["fastkern dequantize_into (one Triton launch)"] = _host_us(lambda: dequantize_into(buf, flat.packed, *flat[1:8]))
    rows["bitsandbytes dequantize_4bit"] = _host_us(lambda: bf.dequantize_4bit(base.weight, state))
    rows["flatten_state (cached validation)"] = _host_us(lambda: flatten_state("probe", base.weight, state, dtype=DT))
    with torch.no_grad():
        rows["lora_linear NF4 forward, no grad"] = _host_us(
            lambda: lora_linear(x, base.weight, a, b, 2.0, quant_state=state))
        dense = torch.empty(N, K, device="cuda", dtype=DT)
        rows["lora_linear 16-bit forward, no grad (same GEMMs, no dequantization)"] = _host_us(
            lambda: lora_linear(x, dense, a, b, 2.0))
        rows["PEFT + bnb layer forward, no grad"] = _host_us(lambda: layer(x))

    def step():
        x.grad = a.grad = b.grad = None
        layer(x).backward(dy)

    rows["PEFT + bnb layer fwd+bwd"] = _host_us(step)
    report = fastkern.patch_model(model, lora=True, mlp=False, rope=False, packing=False)
    assert report.patched_names("lora"), str(report)
    with torch.no_grad():
        rows["patched layer forward, no grad"] = _host_us(lambda: layer(x))
    rows["patched layer fwd+bwd"] = _host_us(step)
    print("\n| call | host us per call |\n|---|---|")
    for name, us in rows.items():
        print(f"| {name} | {us:.1f} |")

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    print("\n### patched layer, 200 fwd+bwd steps, by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(16)


if __name__ == "__main__":
    main()
