"""Tiny random-init models of every family in patches/, built from configs (no downloads)."""

import inspect

import torch
import transformers

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]

_COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=131, max_position_embeddings=256,
)


def tiny_config(family: str, **overrides):
    kw = dict(_COMMON)
    if family == "llama":
        cls = transformers.LlamaConfig
    elif family == "mistral":
        cls = transformers.MistralConfig
    elif family == "qwen2":
        cls = transformers.Qwen2Config
    elif family == "qwen3":
        cls, kw["head_dim"] = transformers.Qwen3Config, 16
    elif family == "gemma":
        cls, kw["head_dim"] = transformers.GemmaConfig, 16
    elif family == "gemma2":
        cls, kw["head_dim"] = transformers.Gemma2Config, 16
    elif family == "gemma3":
        cls, kw["head_dim"] = transformers.Gemma3TextConfig, 16
    else:
        raise ValueError(family)
    kw.update(overrides)
    config = cls(**kw)
    config._attn_implementation = "eager" if family.startswith("gemma2") else "sdpa"
    return config


def tiny_model(family: str, dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model_cls = transformers.Gemma3ForCausalLM if family == "gemma3" else transformers.AutoModelForCausalLM
    if family == "gemma3":
        model = model_cls(config)
    else:
        model = model_cls.from_config(config)
    # Random init scales make every layer matter (default init leaves tiny activations).
    return model.to(dtype).eval()


def batch(vocab=131, b=2, t=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    return ids


def logits_loss_grads(model, ids):
    """(logits, loss, {parameter name: grad}) of one forward+backward with ids as labels."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().clone(), out.loss.detach().clone(), grads


def cache_kwargs():
    """The keyword names the installed transformers' forwards take the KV cache under: transformers 5.25
    renamed `past_key_values` to `cache` (the old name still accepted, deprecated); 5.17-5.23 only know
    `past_key_values`."""
    if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters:
        return ["cache", "past_key_values"]
    return ["past_key_values"]


def output_cache(out):
    """The KV cache of a model output, under whichever field name the installed transformers uses."""
    return out.cache if "cache" in out.__dataclass_fields__ else out.past_key_values
