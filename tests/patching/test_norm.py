"""patch_model's RMSNorm patch (norm=True) on every family: same logits, loss and gradients; what
autograd saves shrinks; per instance; reversible; drift is reported."""

import pytest
import torch

import fastkern
from fastkern.patching import specs as spec_module
from fastkern.patching.core import fastkern_forward_kind
from tests.models import batch, families_with, family_spec, tiny_model
from tests.models import logits_loss_grads as run
from tests.oracle import assert_close, assert_same_fp32_run



def norm_modules(model):
    # RMSNorms with a weight (Llama 4's weightless q/k norm is another class, not patched).
    return [(n, m) for n, m in model.named_modules()
            if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.nn.Parameter)]


def randomize_norm_weights(model, seed=3):
    # Default init (ones, or zeros for the gemma form) hides a wrong weight term; random weights do not.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in norm_modules(model):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5 + (0.0 if hasattr(m, "eps") else 1.0))


@pytest.mark.parametrize("family", families_with("norm"))
def test_family_fp32_same_logits_loss_grads(family):
    model = tiny_model(family)
    randomize_norm_weights(model)
    ids = batch()
    logits0, loss0, grads0 = run(model, ids)
    report = fastkern.patch_model(model, norm=True)
    norms = norm_modules(model)
    assert sorted(report.patched_names("norm")) == sorted(n for n, _ in norms), report
    form = family_spec(family).sections["norm"]["form"] + " form"
    assert all(form in e.detail for e in report.patched if e.kind == "norm"), report
    assert not report.problems and not [e for e in report.skipped if e.kind == "norm"], report
    assert all(fastkern_forward_kind(m) == "norm" for _, m in norms)
    logits1, loss1, grads1 = run(model, ids)
    assert_same_fp32_run((logits1, loss1, grads1), (logits0, loss0, grads0))
    assert any(n.endswith("norm.weight") for n in grads1)  # norm weights got their gradients
    fastkern.unpatch_model(model)
    assert all("forward" not in m.__dict__ for _, m in norms)
    logits2, _, _ = run(model, ids)
    torch.testing.assert_close(logits2, logits0, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_family_bf16_within_oracle(family):
    model64 = tiny_model(family, torch.float64)
    randomize_norm_weights(model64)
    ids = batch()
    ref_logits, ref_loss, ref_grads = run(model64, ids)
    model = tiny_model(family, torch.bfloat16)
    randomize_norm_weights(model)
    plain_logits, plain_loss, plain_grads = run(model, ids)
    fastkern.patch_model(model, norm=True)
    logits, loss, grads = run(model, ids)
    assert_close(logits, ref_logits, torch.bfloat16, plain_logits, "logits", model_level=True)
    assert_close(loss, ref_loss, torch.bfloat16, plain_loss, "loss", model_level=True)
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.q_norm.weight",
                 "model.layers.0.mlp.up_proj.weight"):
        assert_close(grads[name], ref_grads[name], torch.bfloat16, plain_grads[name], name, model_level=True)


def _saved_bytes(module, x):
    seen, total = set(), [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen and key != x.untyped_storage().data_ptr():
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return total[0]


def test_patched_norm_saves_rstd_not_an_fp32_copy():
    model = tiny_model("qwen3", torch.bfloat16).train()
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(2, 50, 64, dtype=torch.bfloat16, requires_grad=True)
    before = _saved_bytes(norm, x)
    fastkern.patch_model(model, norm=True)
    after = _saved_bytes(norm, x)
    assert before >= 2 * 50 * 64 * 4  # transformers keeps x.float()
    assert after <= 2 * 50 * 4 + 64 * 2  # rstd per row (the input and the weight are not copies)


def test_llama_form_with_a_weight_of_another_dtype_falls_back():
    model = tiny_model("llama")
    fastkern.patch_model(model, norm=True)
    norm = model.model.norm
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    got = norm(x)  # fp32 weight, bf16 input: transformers promotes to fp32; the op would not
    want = type(norm).forward(norm, x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_option_is_on_by_default_and_can_be_turned_off():
    assert fastkern.patch_model(tiny_model("llama")).patched_names("norm")
    assert not fastkern.patch_model(tiny_model("llama"), norm=False).patched_names("norm")


def test_drifted_forward_is_caught_by_the_probe(monkeypatch):
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaRMSNorm.forward

    def changed_forward(self, x):  # transformers changed the norm: the patch would be wrong
        return original(self, x) * 1.5

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", changed_forward)
    report = fastkern.patch_model(tiny_model("llama"), norm=True)
    assert not report.patched_names("norm")
    assert "differs from LlamaRMSNorm.forward" in [e for e in report.skipped if e.kind == "norm"][0].detail


def test_unknown_form_and_missing_class_are_problems_not_crashes(monkeypatch):
    def spec(section):
        return spec_module.parse_spec(
            'family = "llama"\nmodel_types = ["llama"]\nmodule = "transformers.models.llama.modeling_llama"\n'
            + section, "patches/llama.toml")

    for section, expected in (
        ('[norm]\nclass = "LlamaRMSNorm"\nform = "layer"\neps = "variance_epsilon"\n', "form 'layer' is not one of"),
        ('[norm]\nclass = "LlamaRMSNormRenamed"\nform = "llama"\neps = "variance_epsilon"\n', "not found in the installed"),
        ('[norm]\nform = "llama"\neps = "variance_epsilon"\n', "missing keys ['class']"),
        ('[norm]\nclass = "LlamaRMSNorm"\nform = "llama"\neps = []\n', "eps must be an attribute name or a non-empty"),
        ('[norm]\nclass = "LlamaRMSNorm"\nform = "llama"\neps = 3\n', "eps must be an attribute name or a non-empty"),
    ):
        monkeypatch.setattr(spec_module, "load_specs", lambda s=spec(section): (s,))
        report = fastkern.patch_model(tiny_model("llama"), norm=True)
        assert not report.patched_names("norm")
        assert any(expected in p for p in report.problems), report


def test_eps_names_the_first_attribute_the_instance_has(monkeypatch):
    """A list of eps names (a class renamed its attribute between transformers releases): the first one the
    instance has is read; none of them is a reported skip."""
    def patched_with(eps):
        spec = spec_module.parse_spec(
            'family = "llama"\nmodel_types = ["llama"]\nmodule = "transformers.models.llama.modeling_llama"\n'
            f'[norm]\nclass = "LlamaRMSNorm"\nform = "llama"\neps = {eps}\n', "patches/llama.toml")
        monkeypatch.setattr(spec_module, "load_specs", lambda: (spec,))
        model = tiny_model("llama")
        for _, m in norm_modules(model):
            m.variance_epsilon = 0.25  # large enough that reading another eps would show in the probe
        return model, fastkern.patch_model(model, norm=True)

    model, report = patched_with('["renamed_eps", "variance_epsilon"]')
    norms = norm_modules(model)
    assert sorted(report.patched_names("norm")) == sorted(n for n, _ in norms), report
    assert all(m._fastkern_norm[0] == "variance_epsilon" for _, m in norms)
    _, report = patched_with('["renamed_eps", "other_eps"]')
    assert not report.patched_names("norm")
    assert all("no 'renamed_eps' or 'other_eps'" in e.detail for e in report.skipped if e.kind == "norm"), report


def test_every_shipped_spec_names_a_norm_class_that_resolves():
    # These normalise with a LayerNorm (mean subtracted: Cohere's and OLMo 1's without bias, OLMo 1's without
    # weight either; StableLM's, Starcoder2's and PhiMoE's nn.LayerNorm): no RMSNorm to patch.
    layer_norm_families = {"cohere", "cohere2", "olmo", "stablelm", "starcoder2", "phimoe"}
    assert {s.family for s in spec_module.load_specs() if "norm" not in s.sections} == layer_norm_families
    for spec in spec_module.load_specs():
        if "norm" in spec.sections:
            spec.resolve(spec.sections["norm"]["class"])
