"""Every family added from a patches/<family>.toml alone: the report patches what the spec promises, and
greedy generate() of the patched model equals the unpatched model's."""

import pytest
import torch

import fastkern
from tests.models import FAMILIES, TINY_CONFIGS, batch, family_spec, tiny_model

# Every family but the first seven (those have their own model-level tests).
FIRST = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"}
ADDED = [f for f in FAMILIES if f not in FIRST]
# spec section -> the patch_model option (report kind) that applies it
SECTION_KIND = {"mlp": "mlp", "norm": "norm", "attention": "rope", "packing": "packing", "causal_lm": "loss"}


def test_every_family_file_has_a_tiny_config():
    # FAMILIES is read from patches/: a new family file without a tiny config fails here, by name.
    assert len(FAMILIES) >= 21 and FIRST <= set(FAMILIES)
    assert not set(FAMILIES) - set(TINY_CONFIGS), f"patches/ families without a tiny config: {set(FAMILIES) - set(TINY_CONFIGS)}"
    assert not set(TINY_CONFIGS) - set(FAMILIES), f"tiny configs without a family file: {set(TINY_CONFIGS) - set(FAMILIES)}"
    with pytest.raises(KeyError, match="no tiny config in tests/models.py"):
        tiny_model("not_a_family")


@pytest.mark.parametrize("family", ADDED)
def test_report_patches_what_the_spec_promises(family):
    model = tiny_model(family)
    report = fastkern.patch_model(model)
    assert report.family == family and not report.problems and not report.skipped, report
    sections = family_spec(family).sections
    for section, kind in SECTION_KIND.items():
        if section in sections:
            assert report.patched_names(kind), f"{family}: [{section}] in the spec but no {kind} patched\n{report}"
        else:
            assert not report.patched_names(kind), f"{family}: no [{section}] in the spec but {kind} patched"


@pytest.mark.parametrize("family", ADDED)
def test_greedy_generate_equals_unpatched(family):
    model = tiny_model(family)
    ids = batch(t=5)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        report = fastkern.patch_model(model)
        assert not report.problems, report
        got = model.generate(ids, **kwargs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
