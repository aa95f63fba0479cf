"""``qk_norm_scope = "head_after_rope"`` (HunYuan dense): the per-head q/k norms see the rotated q and k.

A rotation keeps each head's RMS, so with unit norm weights (a fresh model's) the two orders agree and a
test would not tell them apart: the norm weights are randomised here first.
"""

import dataclasses

import torch

import fastkern
from fastkern.patching import attention as attention_module
from tests.models import tiny_model


def _model():
    model = tiny_model("hunyuan_v1_dense")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return model


def test_norms_after_the_rotation_match_the_family_forward():
    model = _model()
    ids = torch.randint(3, 131, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    report = fastkern.patch_model(model, mlp=False, loss=False)
    assert {e.kind for e in report.patched} >= {"rope", "norm"} and not report.skipped, report
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_norms_before_the_rotation_would_differ(monkeypatch):
    # The same spec with the norms put before the rotation: the patch-time probe must refuse it.
    real = attention_module._config_from_section

    def before_rope(spec, section, fused_rope=True):
        config = real(spec, section, fused_rope)
        return dataclasses.replace(config, qk_norm_scope="head")

    monkeypatch.setattr(attention_module, "_config_from_section", before_rope)
    report = fastkern.patch_model(_model(), mlp=False, loss=False)
    skipped = [e for e in report.skipped if e.kind == "rope"]
    assert len(skipped) == 2 and "differs" in skipped[0].detail, report
