"""QLoRA parity on the GPU: PEFT + bitsandbytes vs fastkern's fused NF4 LoRA layers, under bf16 autocast.

    python3 bench/qlora_parity.py [--layers 2] [--steps 8] [--zero-b] [--configs ...] [--dense]

Built to find the QLoRA training gap of docs/nf4_lora.md (TRL SFT trained slower with the fused NF4
layers forced on under autocast). A Llama-1B-shaped model (hidden 2048, intermediate 8192, 32/8
heads, vocabulary 128256; ``--layers`` decoder layers) is saved, then loaded through transformers'
``BitsAndBytesConfig`` (nf4, double quant, bf16 compute) exactly as the end-to-end bench loads it,
wrapped in PEFT LoRA r16 all-linear with the adapters cast to bf16 (what TRL 1.16 does for quantized
models), gradient checkpointing on and ``enable_input_require_grads`` (as TRL). Then:

1. Dequantization: for every quantized projection, fastkern's ``nf4_dequantize`` vs bitsandbytes'
   CUDA ``dequantize_4bit`` of the same bytes (must be bit-exact).
2. One step's gradients with non-zero lora_B (so dA is not trivially zero): PEFT vs fused, each
   against an fp32 run of the same math (dequantized weights, fp32 adapters, no autocast); the
   per-projection relative error norms of dA, dB, worst first.
3. ``--steps`` AdamW steps (lr 1e-4, constant, as the e2e bench) from PEFT's start (lora_B = 0) on one fixed batch of 1000 token ids: losses
   of the fp32 math, PEFT + bitsandbytes and the fused layers side by side, and each one's mean
   distance from the fp32 losses.

Found (H200, 2026-12-03): the fused layers' gradients were ~140% off under checkpointing whenever
o_proj was fused, because its strided dX misled torch's cuDNN attention backward (configs
``lora fuse:o_proj`` vs ``lora fuse:o_proj nogc`` / ``mathsdpa`` / ``dxcopy`` isolate it). Fixed in
lora_linear; the fused NF4 path is now the default under autocast.
"""

import argparse
import contextlib
import tempfile

import torch

import fastkern
from fastkern.demo import SIZES

try:  # run as a script (bench/ on sys.path) or imported as bench.qlora_parity
    from bench_sft_e2e import only_options
except ImportError:
    from bench.bench_sft_e2e import only_options

# The GPU is what this is for; on CPU (``--tiny``) it checks the harness itself.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _load(path, dense=False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if dense:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": DEV})

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                device_map={"": DEV})


def _peft(model, seed=0, random_b=False, adapters=torch.bfloat16):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    for name, p in model.named_parameters():
        if p.requires_grad:
            if random_b and "lora_B" in name:
                p.data.normal_(0, 0.02)
            p.data = p.data.to(adapters)  # TRL 1.16 casts adapters of quantized models to bf16
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def _grads(model, ids, autocast=True):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _fp32_reference(model):
    """A dense fp32 copy of the PEFT model: every NF4 base dequantized (bnb), adapters in fp32."""
    import bitsandbytes as bnb
    import torch.nn as nn

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                dense = nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None, device=w.device)
                dense.weight.data.copy_(w)
                dense.weight.requires_grad_(False)
                if child.bias is not None:
                    dense.bias.data.copy_(child.bias.float())
                setattr(module, child_name, dense)
    for p in model.parameters():
        p.data = p.data.float()
    return model


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _swap_dequantize(words):
    """'sync': a device synchronization after each dequantization inside lora_linear; 'refdequant': the
    PyTorch reference dequantization there. Returns the function that puts the original back."""
    import sys

    from fastkern.reference.nf4 import block_scales_reference, nf4_dequantize_reference

    module = sys.modules["fastkern.ops.lora_linear"]
    original = module.dequantize_into

    def synced(out, *args):
        original(out, *args)
        if out.is_cuda:
            torch.cuda.synchronize()

    def reference(out, packed, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize):
        scales = block_scales_reference(absmax, nested_blocksize, code2, absmax2, offset)
        out.copy_(nf4_dequantize_reference(packed, code, scales, blocksize, *out.shape, out.dtype))

    original_backward = module._backward_impl

    def contiguous_dx(*args):
        grad_x, *rest = original_backward(*args)
        return (None if grad_x is None else grad_x.contiguous(), *rest)

    if "dxcopy" in words:  # the layer's dX made contiguous (the [W | B] scheme returns a strided view)
        module._backward_impl = contiguous_dx
    if "sync" in words:
        module.dequantize_into = synced
    elif "refdequant" in words:
        module.dequantize_into = reference

    def restore():
        module.dequantize_into = original
        module._backward_impl = original_backward

    return restore


def _summary(grads, ref, everything=False):
    """Median and worst relative error norm over the adapters, and the three worst by name."""
    missing = [n for n in ref if n not in grads]
    errs = sorted(((_rel(grads[n], ref[n]), n.removeprefix("base_model.model.model.").replace(".default.weight", ""))
                   for n in ref if n in grads), reverse=True)
    worst = ", ".join(f"{n} {e:.2e}" for e, n in (errs if everything else errs[:3]))
    # Adam's first step moves every element by lr * sign(g): the share of elements whose sign differs
    # from fp32's is what sets two runs apart after one step (zeros on either side excluded).
    flips = total = 0
    for n in ref:
        if n in grads:
            both = (grads[n] != 0) & (ref[n] != 0)
            flips += int(((grads[n] > 0) != (ref[n] > 0))[both].sum())
            total += int(both.sum())
    text = f"median {errs[len(errs) // 2][0]:.2e}, sign flips {flips / max(total, 1):.2%}, worst {worst}"
    return text + (f"; NO GRADIENT for {missing}" if missing else "")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--zero-b", action="store_true", help="step 2 with lora_B = 0, PEFT's initialization")
    parser.add_argument("--dense", action="store_true", help="bf16 base weights instead of NF4 (the LoRA control)")
    parser.add_argument("--size", default="1b", help="a fastkern.demo.SIZES shape (tiny, small, 1b)")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--configs", default="lora all;lora nogc;lora reentrant;lora sync;lora refdequant;"
                        "lora fuse:q_proj;lora fuse:k_proj;lora fuse:mlp;lora fuse:layers.1.;mlp,rope,packing,lora",
                        help="';'-separated runs for step 2: patch_model options enabled (all others off), then "
                             "settings: nogc, reentrant (checkpointing), noautocast, sync / refdequant (the "
                             "dequantization), fuse:<text> (fuse only layers named so), all (every adapter's error)")
    args = parser.parse_args()
    # TRL keeps PEFT's fp32 adapters on a 16-bit base and casts them to bf16 on a quantized one.
    adapter_dtype = torch.float32 if args.dense else torch.bfloat16
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(SIZES[args.size], num_hidden_layers=args.layers)
    vocab = args.vocab
    base = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=8192, **shape)).to(torch.bfloat16)
    path = tempfile.mkdtemp(prefix="fastkern-qlora-parity-")
    base.save_pretrained(path)
    del base
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (2, args.tokens // 2), generator=gen).to(DEV)]
    # Step 3 trains on one fixed batch over 1000 token ids, so the loss has somewhere to go in a few steps.
    learnable = torch.randint(0, min(vocab, 1000), (2, args.tokens // 2), generator=gen).to(DEV)

    # 1. dequantization, bit for bit
    import bitsandbytes as bnb

    model = _load(path, args.dense)
    worst = 0.0
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            ours = fastkern.ops.nf4_dequantize(module.weight.data, module.weight.quant_state, dtype=torch.bfloat16)
            theirs = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(torch.bfloat16)
            worst = max(worst, (ours.float() - theirs.float()).abs().max().item())
            count += 1
    print(f"1. nf4_dequantize vs bitsandbytes CUDA dequantize_4bit, {count} projections: max abs diff {worst:.3e}")

    # 2. one step's gradients against fp32, for several option sets and settings
    ref = _fp32_reference(_peft(_load(path, args.dense), random_b=not args.zero_b, adapters=adapter_dtype))
    loss_ref, g_ref = _grads(ref, batches[0], autocast=False)
    del ref
    peft_model = _peft(model, random_b=not args.zero_b, adapters=adapter_dtype)
    loss_peft, g_peft = _grads(peft_model, batches[0])
    print(f"2. one step, lora_B {'0' if args.zero_b else 'random'}: loss fp32 {loss_ref:.6f}, PEFT+bnb {loss_peft:.6f}")
    print(f"   PEFT+bnb vs fp32, adapter gradients: {_summary(g_peft, g_ref)}")
    for label in filter(None, args.configs.split(";")):
        only, _, setting = label.partition(" ")
        words = setting.split()
        if "nogc" in words:
            peft_model.gradient_checkpointing_disable()
        elif "reentrant" in words:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        report = fastkern.patch_model(peft_model, **only_options(only))
        keep = [w[5:] for w in words if w.startswith("fuse:")]  # fuse only LoRA layers named so
        if keep:
            for name, module in peft_model.named_modules():
                if getattr(module, "_fastkern_lora", None) and not any(k in name for k in keep):
                    del module.forward
        restore = _swap_dequantize(words)
        with contextlib.ExitStack() as stack:
            if "mathsdpa" in words:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            loss, grads = _grads(peft_model, batches[0], autocast="noautocast" not in words)
        restore()
        fastkern.unpatch_model(peft_model)
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fused = sum(1 for m in peft_model.modules() if "forward" in m.__dict__)
        print(f"   [{label}] {len(report.patched_names('lora'))} lora layers; loss {loss:.6f}; vs fp32: "
              f"{_summary(grads, g_ref, everything='all' in words)}")
        assert fused == 0, "unpatch left forwards behind"
    del peft_model, model

    # 3. a short training run from the same start
    curves = {}
    for label in ("fp32", "PEFT+bnb", "fused"):
        if label == "fp32":  # the same math in fp32 (dequantized base, fp32 adapters, no autocast)
            model = _fp32_reference(_peft(_load(path, args.dense), adapters=torch.float32))
        else:
            model = _peft(_load(path, args.dense), adapters=adapter_dtype)
        if label == "fused":
            fastkern.patch_model(model, lora=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        losses = []
        for ids in [learnable] * args.steps:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(DEV, dtype=torch.bfloat16, enabled=label != "fp32"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[label] = losses
        del model, opt
    print("3. losses per step (AdamW lr 1e-4):")
    for label, losses in curves.items():
        gap = sum(abs(v - r) for v, r in zip(losses, curves["fp32"])) / max(len(losses), 1)
        print(f"   {label:9s} " + " ".join(f"{v:.4f}" for v in losses) + f"   mean |loss - fp32 loss| {gap:.4f}")


if __name__ == "__main__":
    main()
