"""Spec keys for what a family's attention and MLP do only in some layers or only in training:
``output_dropout`` (Seed-OSS's residual_dropout after o_proj and down_proj), ``rope_if`` as a list of
conditions and ``sliding_window_if`` (EXAONE 4: rope where the config has no window or in sliding layers,
the window passed in sliding layers only), ``clip_qkv`` (OLMoE's clamp of q, k and v to a config bound).
The packed-batch side of sliding_window_if is
tests/patching/test_packing.py (exaone4 in WINDOWED); the rerun side of output_dropout is
tests/patching/test_rerun_tail.py."""

import copy
import dataclasses

import pytest
import torch

import fastkern
from fastkern.patching import attention
from fastkern.patching.specs import parse_spec
from tests.models import batch, family_spec, tiny_model


def _loss_and_grads(model, ids, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_output_dropout_applied_as_the_family_applies_it():
    ids = batch()
    plain = tiny_model("seed_oss", residual_dropout=0.2).train()
    model = copy.deepcopy(plain)
    report = fastkern.patch_model(model)
    kinds = {(e.kind, e.name.split(".")[-1]) for e in report.patched}
    assert {("mlp", "mlp"), ("rope", "self_attn")} <= kinds, report
    assert all("dropout(residual_dropout)" in e.detail for e in report.patched if e.kind == "mlp")
    want, got = _loss_and_grads(plain, ids, seed=3), _loss_and_grads(model, ids, seed=3)
    # Same masks from the same seed: the patched forwards draw them at the same points.
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert (got[1] - want[1]).norm() <= 1e-5 * want[1].norm()
    # The dropout is live in training (another seed, another loss) and off in eval.
    assert not torch.equal(_loss_and_grads(model, ids, seed=4)[0], got[0])
    model.eval(), plain.eval()
    assert torch.equal(_loss_and_grads(model, ids, seed=4)[0], _loss_and_grads(model, ids, seed=5)[0])


def test_output_dropout_that_is_not_a_probability_is_skipped():
    model = tiny_model("seed_oss")
    for layer in model.model.layers:
        layer.mlp.residual_dropout = "0.1"
        layer.self_attn.residual_dropout = 1.5
    report = fastkern.patch_model(model)
    reasons = {(e.kind, e.detail) for e in report.skipped}
    assert ("mlp", "residual_dropout = '0.1' is not a dropout probability in [0, 1]") in reasons, report
    assert ("rope", "residual_dropout = 1.5 is not a dropout probability in [0, 1]") in reasons, report
    assert not report.patched_names("mlp") and not report.patched_names("rope")


def _rope_layers(report):
    return {e.name: "no rope in this layer" not in e.detail for e in report.patched if e.kind == "rope"}


@pytest.mark.parametrize("hybrid", [True, False], ids=["sliding+full", "no-window"])
def test_rope_if_any_condition(hybrid):
    overrides = {} if hybrid else dict(sliding_window=None, layer_types=["full_attention", "full_attention"])
    ids = batch()
    plain = tiny_model("exaone4", **overrides)
    model = copy.deepcopy(plain)
    report = fastkern.patch_model(model)
    rotates = _rope_layers(report)
    # Hybrid: the sliding layer 0 rotates, the full layer 1 is NoPE; without a window every layer rotates.
    assert rotates == {"model.layers.0.self_attn": True, "model.layers.1.self_attn": not hybrid}, report
    want, got = _loss_and_grads(plain, ids, seed=0), _loss_and_grads(model, ids, seed=0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert (got[1] - want[1]).norm() <= 1e-5 * want[1].norm()


def test_a_wrong_condition_is_refused_by_the_probe():
    """With only "is_sliding" (the "sliding_window is None" condition left out), a model without a window
    would skip rope everywhere: the probe compares with the class forward and refuses the patch."""
    spec = family_spec("exaone4")
    config = attention._config_from_section(spec, spec.sections["attention"])
    model = tiny_model("exaone4", sliding_window=None, layer_types=["full_attention", "full_attention"])
    attn = model.model.layers[0].self_attn
    assert not attention._probe(attn, config).skips
    wrong = dataclasses.replace(config, rope_if=(("is_sliding", False),))
    verdict = attention._probe(attn, wrong)
    assert verdict.skips and "differs" in verdict.reason, verdict


def test_sliding_window_only_where_the_layer_passes_it(monkeypatch):
    seen = {}
    real = attention._attention_function

    def recording(config, implementation):
        function = real(config, implementation)

        def call(module, *args, **kwargs):
            seen[module.layer_idx] = kwargs.get("sliding_window", "absent")
            return function(module, *args, **kwargs)
        return call

    monkeypatch.setattr(attention, "_attention_function", recording)
    model = tiny_model("exaone4", sliding_window=3)
    fastkern.patch_model(model)
    model(input_ids=batch())
    assert seen == {0: 3, 1: None}


def _attention_section(**keys):
    lines = ['family = "exaone4"', "[attention]", 'class = "Exaone4Attention"']
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return parse_spec("\n".join(lines) + "\n", "patches/test.toml")


@pytest.mark.parametrize("value", ['""', '[]', '["is sliding"]', '["x is not None"]', "3", '[1]'])
def test_bad_rope_if_is_a_clear_error(value):
    spec = _attention_section(rope_if=value)
    with pytest.raises(ValueError, match=r"patches/test.toml \[attention\]: rope_if must be"):
        attention._config_from_section(spec, spec.sections["attention"])


def test_rope_if_forms():
    spec = _attention_section(rope_if='["sliding_window is None", "is_sliding"]')
    config = attention._config_from_section(spec, spec.sections["attention"])
    assert config.rope_if == (("sliding_window", True), ("is_sliding", False))
    spec = _attention_section(rope_if='"use_rope"')
    assert attention._config_from_section(spec, spec.sections["attention"]).rope_if == (("use_rope", False),)


def test_sliding_window_if_needs_a_window_source():
    spec = _attention_section(sliding_window_if='"is_sliding"')
    with pytest.raises(ValueError, match="sliding_window_if needs sliding_window"):
        attention._config_from_section(spec, spec.sections["attention"])


@pytest.mark.parametrize("bound", [0.5, None], ids=["clamped", "no-clip"])
def test_clip_qkv_as_the_family_clamps(bound):
    ids = batch()
    plain = tiny_model("olmoe", clip_qkv=bound).train()
    model = copy.deepcopy(plain)
    report = fastkern.patch_model(model)
    assert len(report.patched_names("rope")) == 2, report
    want, got = _loss_and_grads(plain, ids, seed=0), _loss_and_grads(model, ids, seed=0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert (got[1] - want[1]).norm() <= 1e-5 * want[1].norm()


def test_clip_qkv_matters_and_leaving_it_out_is_refused_by_the_probe():
    """The tiny config's bound clamps part of q, k and v: the same attention without the clamp differs from
    the class forward, and the probe refuses it (a spec that forgot the key cannot give wrong numbers)."""
    spec = family_spec("olmoe")
    config = attention._config_from_section(spec, spec.sections["attention"])
    attn = tiny_model("olmoe", clip_qkv=0.5).model.layers[0].self_attn
    assert not attention._probe(attn, config).skips
    verdict = attention._probe(attn, dataclasses.replace(config, clip_qkv=None))
    assert verdict.skips and "differs" in verdict.reason, verdict


@pytest.mark.parametrize("bound", [-1.0, 0.0, "1", True])
def test_clip_qkv_that_is_not_a_positive_bound_is_skipped(bound):
    model = tiny_model("olmoe")
    vars(model.config)["clip_qkv"] = bound  # past the config's own type check (a config edited by hand)
    report = fastkern.patch_model(model)
    reasons = {(e.kind, e.detail) for e in report.skipped}
    assert ("rope", f"config.clip_qkv = {bound!r} is not a positive clip bound") in reasons, report
    assert not report.patched_names("rope") and not report.patched_names("packing"), report


def test_clip_qkv_naming_a_missing_config_attribute_is_skipped():
    spec = _attention_section(clip_qkv='"qkv_bound"')
    config = attention._config_from_section(spec, spec.sections["attention"])
    attn = tiny_model("exaone4").model.layers[0].self_attn
    assert attention.module_problem(attn, config) == "Exaone4Attention's config has no attribute 'qkv_bound' (clip_qkv)"
