"""Patch-time probes inspect the model without changing it, whatever mode it is in.

A probe runs the original and the patched forward of one module on a random input and compares them.
Two states of a real model used to defeat it: a PEFT model in training mode with lora_dropout (the two
runs drew different dropout masks, so correct patches measured as mismatches and were skipped, and the
probe drew from the global RNG), and a bitsandbytes 4-bit model in eval mode on the CPU (the original
forward repacked the NF4 weight in place for bitsandbytes' CPU kernel, or failed on widths that packing
cannot tile, and the failure escaped patch_model)."""

import re

import pytest
import torch
import torch.nn as nn

import fastkern
from tests.models import FAMILIES, tiny_model

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model, dropout, attention_only=False):
    # The decoder's nn.Linear projections by full name (a string is one regular expression matched
    # against whole module names).
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")
             and (not attention_only or n.rsplit(".", 1)[-1] in TARGETS[:4])]
    targets = "|".join(re.escape(n) for n in names)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


def _patched_kinds(report) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for entry in report.patched:
        kinds[entry.kind] = kinds.get(entry.kind, 0) + 1
    return kinds


# PEFT adds LoRA on the routed experts by itself when gate/up projections are targeted (0.21: Qwen3-MoE,
# Qwen3-Next, GLM-4-MoE, DeepSeek-V3; 0.22 also Qwen2-MoE, through its weight-conversion map), a LoRA type
# that refuses dropout: those families' tiny models run dense MLPs in every layer here (the experts' probe
# is tests/patching/test_moe.py's).
DENSE = {"qwen3_moe": dict(mlp_only_layers=[0, 1]), "qwen2_moe": dict(mlp_only_layers=[0, 1]),
         "qwen3_next": dict(mlp_only_layers=[0, 1]), "glm4_moe": dict(first_k_dense_replace=2),
         "deepseek_v3": dict(first_k_dense_replace=2), "deepseek_v2": dict(first_k_dense_replace=2),
         "ernie4_5_moe": dict(moe_layer_start_index=2), "dots1": dict(first_k_dense_replace=2),
         "exaone_moe": dict(mlp_layer_types=["dense", "dense"]),
         "cohere2_moe": dict(mlp_layer_types=["dense", "dense"]),
         "glm4_moe_lite": dict(mlp_layer_types=["dense", "dense"]), "afmoe": dict(num_dense_layers=2)}
# Every layer MoE and no dense-only config: LoRA on the attention projections only (the gate/up
# projections would bring PEFT's expert LoRA in).
ATTENTION_ONLY = {"hunyuan_v1_moe", "solar_open"}


@pytest.mark.parametrize("family", FAMILIES)
def test_training_mode_with_lora_dropout_patches_as_in_eval_mode(family):
    # Reference: the same model in eval mode, where no dropout is active.
    only = family in ATTENTION_ONLY
    reference = _lora(tiny_model(family, **DENSE.get(family, {})), dropout=0.1, attention_only=only).eval()
    want = _patched_kinds(fastkern.patch_model(reference))
    model = _lora(tiny_model(family, **DENSE.get(family, {})), dropout=0.1, attention_only=only).train()
    flags = [m.training for m in model.modules()]
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    report = fastkern.patch_model(model)
    assert torch.equal(torch.get_rng_state(), rng), "a probe drew from the global RNG"
    assert [m.training for m in model.modules()] == flags, "a probe left a module's training flag changed"
    assert _patched_kinds(report) == want, report
    assert not [e for e in report.skipped if "differs" in e.detail], report


def _qlora_eval_model(intermediate_size):
    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in TARGETS and type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                setattr(module, name, q.to("cpu"))
    # from_pretrained returns a model in eval mode; in eval mode bitsandbytes' CPU forward repacks.
    return _lora(model, dropout=0.0).eval()


@pytest.mark.parametrize("intermediate_size", [96, 128])  # 96: a width bitsandbytes' CPU packing cannot tile
def test_probes_leave_nf4_weights_of_an_eval_model_as_they_are(intermediate_size):
    model = _qlora_eval_model(intermediate_size)
    bases = [m for m in model.modules() if m.__class__.__name__ == "Linear4bit"]
    before = [(b.weight.data.clone(), dict(vars(b.weight.quant_state))) for b in bases]
    report = fastkern.patch_model(model)
    for base, (data, state) in zip(bases, before):
        assert base.weight.data.shape == data.shape and torch.equal(base.weight.data, data)
        assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
        assert set(vars(base.weight.quant_state)) == set(state)
    kinds = _patched_kinds(report)
    assert kinds.get("mlp") and kinds.get("rope") and kinds.get("lora") == len(bases), report
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_probe_that_raises_skips_the_module_with_the_reason(monkeypatch):
    from fastkern.patching import mlp

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(mlp, "_glu_mlp", broken)
    report = fastkern.patch_model(tiny_model("llama"))
    reasons = [e.detail for e in report.skipped if e.kind == "mlp"]
    assert reasons and all("failed on a probe input: RuntimeError: no kernel for this" in r for r in reasons), report
