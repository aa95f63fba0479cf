"""What one recomputed decoder layer keeps for its backward, counted exactly (any machine, CPU is fine).

    python3 bench/saved_activations.py [--tokens 9216] [--family qwen3]

With gradient checkpointing, a step's memory peak is reached in the backward of one layer: the
recomputed layer's saved activations (plus the gradients in flight) on top of the checkpointed layer
inputs. This counts the first term for the GRPO bench's model (Qwen3-0.6B shape: hidden 1024,
intermediate 3072, 16/8 heads of 128; LoRA r16 on all linear layers; bf16) by recording every tensor
autograd saves during one layer's forward (saved_tensors_hooks), deduplicated by storage, grouped by the
autograd node that saved it. Byte counts do not depend on the device, so the CPU gives the same numbers
as the GPU. Variants: unpatched, and patch_model with mlp/rope/lora as given.
"""

import argparse
import collections

import torch


def build_layer_model(family: str, tokens: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    if family != "qwen3":
        raise SystemExit("only the GRPO bench's qwen3 shape is set up here")
    config = AutoConfig.for_model(
        "qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=1024, max_position_embeddings=max(tokens, 4096),
        tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(torch.bfloat16)


def count(model, tokens: int):
    """{(module, dtype, shape): bytes}, over one forward of the model's single decoder layer: each saved
    storage counted once, charged to the innermost module running when it was first saved (the layer's
    input, which checkpointing keeps anyway, is not counted)."""
    decoder = model.get_decoder()
    layer = decoder.layers[0]
    hidden = torch.randn(1, tokens, 1024, dtype=torch.bfloat16, requires_grad=True)
    position_ids = torch.arange(tokens)[None]
    cos_sin = decoder.rotary_emb(hidden, position_ids)
    seen, by_site, stack = set(), collections.Counter(), ["layer"]
    # No hooks on LoRA base layers: a hooked base makes fastkern's LoRA patch fall back to PEFT's
    # forward (hooks must run), which would count PEFT's activations under the patched label.
    names = {m: n for n, m in layer.named_modules() if not n.endswith("base_layer")}

    def enter(module, args):
        stack.append(names[module] or "layer")

    def leave(module, args, output):
        stack.pop()  # returns None: the module's output is left as it is

    hooks = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and storage.data_ptr() != hidden.untyped_storage().data_ptr():
            seen.add(key)
            site = stack[-1]
            by_site[(site, str(t.dtype).removeprefix("torch."), tuple(t.shape))] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(hidden, position_embeddings=cos_sin, position_ids=position_ids, attention_mask=None)
    finally:
        for h in hooks:
            h.remove()
    return by_site


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=9216)
    ap.add_argument("--family", default="qwen3")
    ap.add_argument("--variants", default="unpatched;mlp,rope;mlp,rope,lora;mlp,rope,lora,norm")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    import fastkern

    for variant in args.variants.split(";"):
        model = build_layer_model(args.family, args.tokens)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
        if variant != "unpatched":
            wanted = set(variant.split(","))
            fastkern.patch_model(model, mlp="mlp" in wanted, rope="rope" in wanted, lora="lora" in wanted,
                                 norm="norm" in wanted, packing=False, loss=False)
        model.train()
        by_site = count(model, args.tokens)
        total = sum(by_site.values())
        print(f"\n{variant}: {total / 2**20:.1f} MiB saved by one layer at {args.tokens} tokens")
        for (site, dtype, shape), nbytes in by_site.most_common():
            print(f"  {site:45s} {dtype:9s} {str(list(shape)):22s} {nbytes / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
