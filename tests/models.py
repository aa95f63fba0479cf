"""Tiny random-init models of every family in patches/, built from configs (no downloads).

The families are the files in patches/; each needs its tiny config in TINY_CONFIGS below (a family file
without one fails tests/patching/test_families.py and every tiny_model call for it, naming the file).
"""

import inspect

import torch
import transformers

from fastkern.patching.specs import load_specs

FAMILIES = [s.family for s in load_specs()]
# Families whose attention runs under eager only in these tests: transformers' sdpa refuses Gemma2's and
# VaultGemma's logit softcap, and gpt-oss's attention sinks exist only in its eager function (and
# flash/flex kernels).
EAGER_ONLY = {"gemma2", "gpt_oss", "vaultgemma"}
# The MoE families (stacked experts in [moe_experts], or a loss section that passes the router logits on).
# transformers' MoE experts run grouped_mm, which has no float64 kernel: these families have no float64
# reference run (the accuracy-rule tests use the others).
MOE = {s.family for s in load_specs()
       if "moe_experts" in s.sections or "router_logits" in s.sections.get("causal_lm", {})}
FLOAT64_FAMILIES = [f for f in FAMILIES if f not in MOE]
# Token ids inside the tiny vocabulary (some configs default to ids past it, e.g. GLM's pad 151329).
_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Two experts of four per token: every expert path is exercised on an 11-token batch.
_MOE = dict(num_experts_per_tok=2)

_COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=131, max_position_embeddings=256,
)


# Per family: the config class and what differs from _COMMON. Options a family's forward has (multipliers,
# qk norms, NoPE layers, sliding layers, dense layers among MoE ones) are switched on so the tests cover them.
TINY_CONFIGS = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=16)),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16)),
    "gemma3": (transformers.Gemma3TextConfig, dict(head_dim=16)),
    "olmo": (transformers.OlmoConfig, dict(_SPECIAL, clip_qkv=1.0)),  # q, k, v clamped at 1.0; LayerNorm
    "olmo2": (transformers.Olmo2Config, dict(_SPECIAL)),
    "olmo3": (transformers.Olmo3Config, dict(_SPECIAL, layer_types=["sliding_attention", "full_attention"],
                                             sliding_window=4)),
    "granite": (transformers.GraniteConfig, dict(_SPECIAL, embedding_multiplier=2.0, residual_multiplier=0.5,
                                                 attention_multiplier=0.2, logits_scaling=4.0)),
    "glm": (transformers.GlmConfig, dict(_SPECIAL, head_dim=16)),  # partial_rotary_factor 0.5 by default
    "glm4": (transformers.Glm4Config, dict(_SPECIAL, head_dim=16)),
    "smollm3": (transformers.SmolLM3Config, dict(_SPECIAL, no_rope_layers=[1, 0])),  # layer 1 is NoPE
    "cohere": (transformers.CohereConfig, dict(_SPECIAL, use_qk_norm=True, logit_scale=0.5)),
    "cohere2": (transformers.Cohere2Config, dict(_SPECIAL, layer_types=["sliding_attention", "full_attention"],
                                                 sliding_window=4, logit_scale=0.5)),
    "qwen3_5": (transformers.Qwen3_5TextConfig, dict(
        _SPECIAL, head_dim=16, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4)),
    # partial rotary (rotary_dim = head_dim / 2), fused qkv_proj and gate_up_proj
    "phi3": (transformers.Phi3Config, dict(_SPECIAL, partial_rotary_factor=0.5)),
    "helium": (transformers.HeliumConfig, dict(_SPECIAL, head_dim=16)),
    "seed_oss": (transformers.SeedOssConfig, dict(_SPECIAL, head_dim=16, attention_dropout=0.0, residual_dropout=0.0)),
    "hunyuan_v1_dense": (transformers.HunYuanDenseV1Config, dict(_SPECIAL, head_dim=16)),  # q/k norms after rope
    "exaone4": (transformers.Exaone4Config, dict(_SPECIAL, layer_types=["sliding_attention", "full_attention"],
                                                 sliding_window=4)),
    # one window (4) for every layer; biases on q/k/v/o; LayerNorm and a plain MLP (not patched)
    "starcoder2": (transformers.Starcoder2Config, dict(_SPECIAL, sliding_window=4, attention_dropout=0.0,
                                                       residual_dropout=0.0, embedding_dropout=0.0)),
    # partial rotary (0.25 by default), q/k/v biases; LayerNorm (not patched)
    "stablelm": (transformers.StableLmConfig, dict(_SPECIAL, use_qkv_bias=True)),
    # dense MLPs (is_moe off); dynamic mask attention (not patched)
    "doge": (transformers.DogeConfig, dict(_SPECIAL, head_dim=16, keep_window_size=4)),
    "ernie4_5": (transformers.Ernie4_5Config, dict(_SPECIAL, head_dim=16)),
    "arcee": (transformers.ArceeConfig, dict(_SPECIAL, head_dim=16)),  # relu2 MLP, not gated
    # layer 0 sliding (window 4), layer 1 full; attention logit softcap, final logit softcap
    "vaultgemma": (transformers.VaultGemmaConfig, dict(_SPECIAL, head_dim=16, sliding_window=4,
                                                       layer_types=["sliding_attention", "full_attention"])),
    "ministral": (transformers.MinistralConfig, dict(_SPECIAL, head_dim=16, sliding_window=4,
                                                     layer_types=["sliding_attention", "full_attention"])),
    "ministral3": (transformers.Ministral3Config, dict(_SPECIAL, head_dim=16)),  # attention not patched
    "apertus": (transformers.ApertusConfig, dict(_SPECIAL, head_dim=16)),  # xIELU MLP, not gated; q/k norms
    # layer 1 MoE (shared expert + 4 experts, top 1), layer 0 dense; layer 1 NoPE with chunked attention in
    # layer 0 (chunk 4 of the 11-token batches)
    "llama4": (transformers.Llama4TextConfig, dict(_SPECIAL, head_dim=16, intermediate_size=32,
                                                   intermediate_size_mlp=96, num_local_experts=4,
                                                   num_experts_per_tok=1, interleave_moe_layer_step=2,
                                                   no_rope_layer_interval=2, attention_chunk_size=4)),
    # layer 0 linear attention, layer 1 full attention, both MoE (4 experts + a shared one)
    "qwen3_next": (transformers.Qwen3NextConfig, dict(
        _SPECIAL, head_dim=16, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, **_MOE)),
    # layer 0 dense, layer 1 MoE (4 routed experts in 2 groups, a shared one); q/k norms, partial rotary
    "glm4_moe": (transformers.Glm4MoeConfig, dict(
        _SPECIAL, head_dim=16, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
        moe_intermediate_size=32, n_group=2, topk_group=1, use_qk_norm=True, **_MOE)),
    # layer 0 dense, layer 1 MoE; multi-head latent attention (not patched; as many kv heads as heads)
    "deepseek_v3": (transformers.DeepseekV3Config, dict(
        _SPECIAL, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
        moe_intermediate_size=32,
        n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, **_MOE)),
    "mixtral": (transformers.MixtralConfig, dict(_SPECIAL, num_local_experts=4, **_MOE)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(_SPECIAL, num_experts=4, moe_intermediate_size=32,
                                                    shared_expert_intermediate_size=48, **_MOE)),
    # layer 0 dense (mlp_only_layers), layer 1 MoE
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(_SPECIAL, head_dim=16, num_experts=4, moe_intermediate_size=32,
                                                    mlp_only_layers=[0], **_MOE)),
    # every layer MoE; q, k, v clamped at 1.0 (about a third of the normalised q and k entries)
    "olmoe": (transformers.OlmoeConfig, dict(_SPECIAL, num_experts=4, clip_qkv=1.0, **_MOE)),
    # layer 0 dense, layer 1 MoE (4 routed experts, a shared one)
    "ernie4_5_moe": (transformers.Ernie4_5_MoeConfig, dict(
        _SPECIAL, head_dim=16, moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
        moe_layer_start_index=1, moe_layer_end_index=1)),
    # every layer MoE (4 experts + the shared MLP); q/k norms after the rotation
    "hunyuan_v1_moe": (transformers.HunYuanMoEV1Config, dict(_SPECIAL, head_dim=16, num_experts=4, moe_topk=2)),
    # every layer MoE; q/k norms over the whole projection as olmo2
    "flex_olmo": (transformers.FlexOlmoConfig, dict(_SPECIAL, num_experts=4, **_MOE)),
    # layer 0 dense and sliding (window 4), layer 1 MoE (4 routed experts in 2 groups, a shared one); q/k norms
    "dots1": (transformers.Dots1Config, dict(
        _SPECIAL, head_dim=16, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
        moe_intermediate_size=32, n_group=2, topk_group=1, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], **_MOE)),
    # every layer MoE (4 routed experts in 2 groups, a shared one)
    "solar_open": (transformers.SolarOpenConfig, dict(
        _SPECIAL, head_dim=16, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32, n_group=2,
        topk_group=1, **_MOE)),
    # layer 0 dense and sliding (window 4, rope), layer 1 MoE (4 routed experts in 2 groups, a shared one) and
    # full (NoPE); q/k norms
    "exaone_moe": (transformers.ExaoneMoeConfig, dict(
        _SPECIAL, head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
        mlp_layer_types=["dense", "sparse"], num_experts=4, num_shared_experts=1, moe_intermediate_size=32,
        n_group=2, topk_group=1, **_MOE)),
    # layer 0 linear attention, layer 1 full attention, both MoE (4 experts + a gated shared one)
    "qwen3_5_moe": (transformers.Qwen3_5MoeTextConfig, dict(
        _SPECIAL, head_dim=16, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
        num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, **_MOE)),
    # layer 0 dense and full attention with forced rope (force_rope), layer 1 MoE (4 experts + a shared one,
    # averaged) and sliding (window 4, rope); RMSNorm (rms_norm_eps set). NoPE full layers: as cohere2
    "cohere2_moe": (transformers.Cohere2MoeConfig, dict(
        _SPECIAL, layer_types=["full_attention", "sliding_attention"], mlp_layer_types=["dense", "sparse"],
        prefix_dense_intermediate_size=96, sliding_window=4, num_experts=4, num_shared_experts=1,
        rms_norm_eps=1e-5, logit_scale=0.5, **_MOE)),
    # layer 0 dense, layer 1 MoE (4 routed experts, a shared one); multi-head latent attention (not patched)
    "deepseek_v2": (transformers.DeepseekV2Config, dict(
        _SPECIAL, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
        moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, **_MOE)),
    # every layer MoE (4 experts); Granite's multipliers as in granite
    "granitemoe": (transformers.GraniteMoeConfig, dict(
        _SPECIAL, num_local_experts=4, embedding_multiplier=2.0, residual_multiplier=0.5,
        attention_multiplier=0.2, logits_scaling=4.0, **_MOE)),
    # as granitemoe, plus the shared expert (a fused gate|up MLP) in every layer
    "granitemoeshared": (transformers.GraniteMoeSharedConfig, dict(
        _SPECIAL, num_local_experts=4, shared_intermediate_size=48, embedding_multiplier=2.0,
        residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0, **_MOE)),
    # every layer MoE (4 experts, sparsemixer top 2); sliding window 4; LayerNorm (not patched). Sparsemixer's
    # routing weight is a softmax over the logits within 2 * router_jitter_noise (relative) of the best, a
    # threshold where rounding differences change a weight: 0 here keeps patched and unpatched routing equal
    "phimoe": (transformers.PhimoeConfig, dict(_SPECIAL, num_local_experts=4, sliding_window=4,
                                               router_jitter_noise=0.0, **_MOE)),
    # every layer MoE (4 experts, sigmoid router); q/k norms over the whole projection, partial rotary
    "minimax_m2": (transformers.MiniMaxM2Config, dict(_SPECIAL, head_dim=16, partial_rotary_factor=0.5,
                                                      num_local_experts=4, intermediate_size=32, **_MOE)),
    # layer 0 dense, layer 1 MoE (4 routed experts in 2 groups, a shared one); multi-head latent attention
    # (not patched; as many kv heads as heads)
    "glm4_moe_lite": (transformers.Glm4MoeLiteConfig, dict(
        _SPECIAL, num_key_value_heads=4, mlp_layer_types=["dense", "sparse"], n_routed_experts=4,
        n_shared_experts=1, moe_intermediate_size=32, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **_MOE)),
    # layer 0 dense and sliding (window 4, rope), layer 1 MoE (4 experts, a shared one) and full (NoPE);
    # attention not patched (gated output)
    "afmoe": (transformers.AfmoeConfig, dict(
        _SPECIAL, head_dim=16, num_dense_layers=1, num_experts=4, num_shared_experts=1, moe_intermediate_size=32,
        layer_types=["sliding_attention", "full_attention"], sliding_window=4, **_MOE)),
    "gpt_oss": (transformers.GptOssConfig, dict(_SPECIAL, head_dim=16, num_local_experts=4, sliding_window=4,
                                                layer_types=["sliding_attention", "full_attention"], **_MOE)),
}


def tiny_config(family: str, **overrides):
    if family not in TINY_CONFIGS:
        known = "patches/" + family + ".toml exists" if family in FAMILIES else "no such family in patches/"
        raise KeyError(f"{family!r} has no tiny config in tests/models.py TINY_CONFIGS ({known})")
    cls, extra = TINY_CONFIGS[family]
    config = cls(**{**_COMMON, **extra, **overrides})
    config._attn_implementation = "eager" if family in EAGER_ONLY else "sdpa"
    return config


def family_spec(family: str):
    return next(s for s in load_specs() if s.family == family)


def families_with(section: str) -> list[str]:
    """The families whose patches/<family>.toml has ``section`` ([mlp], [norm], [attention], ...)."""
    return [f for f in FAMILIES if section in family_spec(f).sections]


def tiny_model(family: str, dtype=torch.float32, seed=0, attn: str | None = None, **overrides):
    """The family's tiny causal LM, seeded; ``attn`` overrides the attention implementation (sdpa, or eager
    for EAGER_ONLY)."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    if attn is not None:
        config._attn_implementation = attn
    direct = {"gemma3": transformers.Gemma3ForCausalLM, "qwen3_5": transformers.Qwen3_5ForCausalLM}
    model_cls = direct.get(family, transformers.AutoModelForCausalLM)
    if family in direct:
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


def model_from_config(config, seed=0):
    """A causal LM built on this very config object, as ``XForCausalLM(config)`` does (models built this way
    share it, unlike ``from_config``), seeded so that two calls give the same weights."""
    torch.manual_seed(seed)
    try:
        model_cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        model_cls = {"gemma3_text": transformers.Gemma3ForCausalLM,
                     "qwen3_5_text": transformers.Qwen3_5ForCausalLM}[config.model_type]
    return model_cls(config).eval()
