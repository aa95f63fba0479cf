"""patch_model's MLP patch on every family: same logits, loss and gradients; per instance; reversible."""

import copy

import pytest
import torch

import fastkern
from fastkern.patching import specs as spec_module
from fastkern.patching.core import fastkern_forward_kind
from tests.models import batch, families_with, family_spec, tiny_model
from tests.models import logits_loss_grads as run
from tests.oracle import assert_close, assert_same_fp32_run

EXPECTED = {f: "swiglu" for f in ("llama", "mistral", "qwen2", "qwen3")} | {
    f: "geglu(tanh)" for f in ("gemma", "gemma2", "gemma3", "vaultgemma")}


def mlp_modules(model):
    return [m for n, m in model.named_modules() if n.endswith(".mlp")]


def spec_mlp_modules(model, family):
    """(name, module) of every module of the family's [mlp] class (MoE families: shared experts, dense layers)."""
    cls = family_spec(family).sections["mlp"]["class"]
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == cls]


@pytest.mark.parametrize("family", families_with("mlp"))
def test_family_fp32_same_logits_loss_grads(family):
    model = tiny_model(family)
    ids = batch()
    logits0, loss0, grads0 = run(model, ids)
    report = fastkern.patch_model(model)
    names = report.patched_names("mlp")
    expected = spec_mlp_modules(model, family)
    assert names and sorted(names) == sorted(n for n, _ in expected), report
    assert all(EXPECTED.get(family, "swiglu") in e.detail for e in report.patched if e.kind == "mlp"), report
    assert report.family == family and not report.problems
    assert all(fastkern_forward_kind(m) == "mlp" for _, m in expected)
    logits1, loss1, grads1 = run(model, ids)
    assert_same_fp32_run((logits1, loss1, grads1), (logits0, loss0, grads0))
    restored = fastkern.unpatch_model(model)
    assert len([e for e in restored.patched if e.kind == "mlp"]) == len(expected)
    assert all("forward" not in m.__dict__ for _, m in expected)
    assert all(not any(k.startswith("_fastkern") for k in m.__dict__) for _, m in expected)
    logits2, _, _ = run(model, ids)
    torch.testing.assert_close(logits2, logits0, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_family_bf16_within_oracle(family):
    model64 = tiny_model(family, torch.float64)
    ids = batch()
    ref_logits, ref_loss, ref_grads = run(model64, ids)
    model = tiny_model(family, torch.bfloat16)
    plain_logits, plain_loss, plain_grads = run(model, ids)
    fastkern.patch_model(model)
    logits, loss, grads = run(model, ids)
    assert_close(logits, ref_logits, torch.bfloat16, plain_logits, "logits", model_level=True)
    assert_close(loss, ref_loss, torch.bfloat16, plain_loss, "loss", model_level=True)
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        assert_close(grads[name], ref_grads[name], torch.bfloat16, plain_grads[name], name, model_level=True)


def test_other_instances_untouched_and_idempotent():
    a, b = tiny_model("llama"), tiny_model("llama")
    fastkern.patch_model(a)
    assert all(fastkern_forward_kind(m) is None for m in mlp_modules(b))
    again = fastkern.patch_model(a)
    assert not again.patched_names("mlp")
    assert {e.detail for e in again.skipped if e.kind == "mlp"} == {"already patched"}
    # A deep copy (TRL builds reference models this way) carries the patch bound to the copy's modules.
    c = copy.deepcopy(a)
    for m in mlp_modules(c):
        assert m.forward.__self__ is m


def test_report_is_readable():
    model = tiny_model("qwen3")
    text = repr(fastkern.patch_model(model))
    assert "model.layers.{0..1}.mlp: Qwen3MLP -> swiglu" in text
    assert "skipped (0)" in text


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="unknown option"):
        fastkern.patch_model(tiny_model("llama"), mlpp=True)


def test_option_off_patches_nothing():
    model = tiny_model("llama")
    report = fastkern.patch_model(model, mlp=False)
    assert not report.patched_names("mlp") and report.options["mlp"] is False


def test_other_activation_is_detected_or_skipped():
    gelu_llama = tiny_model("llama", hidden_act="gelu")
    report = fastkern.patch_model(gelu_llama)
    assert all("geglu(erf)" in e.detail for e in report.patched if e.kind == "mlp") and report.patched
    relu_llama = tiny_model("llama", hidden_act="relu")
    report = fastkern.patch_model(relu_llama)
    assert not report.patched_names("mlp")
    mlp_skips = [e for e in report.skipped if e.kind == "mlp"]
    assert len(mlp_skips) == 2 and "not silu" in mlp_skips[0].detail


def test_symbol_that_moved_is_reported_not_raised(monkeypatch):
    broken = spec_module.parse_spec(
        'family = "llama"\nmodel_types = ["llama"]\nmodule = "transformers.models.llama.modeling_llama"\n'
        '[mlp]\nclass = "LlamaMLPRenamed"\ngate = "gate_proj"\nup = "up_proj"\ndown = "down_proj"\n'
        'act = "act_fn"\nactivation = "silu"\n',
        "patches/llama.toml",
    )
    monkeypatch.setattr(spec_module, "load_specs", lambda: (broken,))
    model = tiny_model("llama")
    report = fastkern.patch_model(model)
    assert not report.patched_names("mlp")
    assert any("LlamaMLPRenamed not found in the installed transformers" in p for p in report.problems), report


def test_drifted_forward_is_caught_by_the_probe(monkeypatch):
    from transformers.models.llama import modeling_llama

    def changed_forward(self, x):  # transformers changed the MLP: the fused patch would be wrong
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", changed_forward)
    report = fastkern.patch_model(tiny_model("llama"))
    assert not report.patched_names("mlp")
    assert "differs from LlamaMLP.forward" in [e for e in report.skipped if e.kind == "mlp"][0].detail


def test_instance_forward_owned_by_someone_else_is_skipped():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: type(mlp).forward(mlp, x)
    report = fastkern.patch_model(model)
    assert report.patched_names("mlp") == ["model.layers.1.mlp"]
    assert "already overridden" in [e for e in report.skipped if e.kind == "mlp"][0].detail


def test_every_shipped_spec_resolves_in_installed_transformers():
    """Each [mlp] class named in patches/*.toml is an nn.Module class of that name in its family's module
    (resolve raises LookupError when transformers renamed or moved it)."""
    resolved = {}
    for spec in spec_module.load_specs():
        if "mlp" in spec.sections:
            name = spec.sections["mlp"]["class"]
            cls = spec.resolve(name)
            assert isinstance(cls, type) and issubclass(cls, torch.nn.Module), (spec.source, cls)
            assert cls.__name__ == name.rsplit(".", 1)[-1], (spec.source, cls)
            resolved[spec.family] = cls
    assert "llama" in resolved and len(resolved) > 1  # the specs were read, not an empty loop


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    ids = batch()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    for n, p in pm.named_parameters():  # non-zero B so LoRA contributes
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    logits0, loss0, grads0 = run(pm, ids)
    report = fastkern.patch_model(pm)
    assert report.family == "llama" and len(report.patched_names("mlp")) == 2, report
    logits1, loss1, grads1 = run(pm, ids)
    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-5)
    assert grads1.keys() == grads0.keys() and any("lora_A" in k for k in grads0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)
    with pm.disable_adapter():
        base_patched = pm(input_ids=ids).logits
    fastkern.unpatch_model(pm)
    with pm.disable_adapter():
        base_plain = pm(input_ids=ids).logits
    torch.testing.assert_close(base_patched, base_plain, rtol=1e-5, atol=1e-5)
