"""The family-file loader: defaults for the usual names, every key checked, short and full files alike.

family_specs_frozen.json holds every dense family's parsed spec as it was when each file still spelled out
every key (generated once from those files); the short files must parse to exactly that.
"""

import json
import pathlib
import tomllib

import pytest

import fastkern
from fastkern.patching import specs as spec_module
from tests.models import tiny_model

FROZEN = json.loads((pathlib.Path(__file__).parent / "family_specs_frozen.json").read_text())


def _as_dict(spec):
    return {"model_types": list(spec.model_types), "module": spec.module, "sections": spec.sections}


def _full_file(family: str, frozen: dict) -> str:
    """The family's spec with every key spelled out, as the files were written before defaults existed."""
    lines = [f"family = {json.dumps(family)}", f"model_types = {json.dumps(frozen['model_types'])}",
             f"module = {json.dumps(frozen['module'])}"]
    for name, section in frozen["sections"].items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in section.items()]
    return "\n".join(lines) + "\n"


def test_short_family_files_parse_to_the_frozen_specs():
    loaded = {s.family: s for s in spec_module.load_specs()}
    assert len(FROZEN) == 17 and set(FROZEN) <= set(loaded)
    for family, frozen in FROZEN.items():
        assert _as_dict(loaded[family]) == frozen, family


@pytest.mark.parametrize("family", sorted(FROZEN))
def test_full_and_short_file_give_the_same_spec(family):
    full = spec_module.parse_spec(_full_file(family, FROZEN[family]), f"patches/{family}.toml")
    short = next(s for s in spec_module.load_specs() if s.family == family)
    assert full == short
    # The short file really is short: it states less than the full one (at least the defaulted names).
    data = tomllib.loads((pathlib.Path(__file__).parents[2] / "patches" / f"{family}.toml").read_text())
    assert "module" not in data and "backbone" not in data.get("causal_lm", {}), family


def test_every_shipped_file_passes_the_key_check():
    # Full (explicit) files, as the MoE families write them, load like short ones; nothing is dropped.
    for spec in spec_module.load_specs():
        for name, section in spec.sections.items():
            assert set(section) <= set(spec_module.SECTION_KEYS[name]), (spec.source, name)
            assert "class" in section, (spec.source, name)


def test_defaults_fill_only_what_a_file_leaves_out():
    spec = spec_module.parse_spec(
        'family = "demo"\n[mlp]\nclass = "DemoMLP"\nactivation = "gelu"\n'
        '[norm]\nclass = "DemoRMSNorm"\neps = "eps"\n[causal_lm]\nclass = ["A", "B"]\nhead = "out"\n',
        "patches/demo.toml")
    assert spec.model_types == ("demo",) and spec.module == "transformers.models.demo.modeling_demo"
    assert spec.sections == {
        "mlp": {"class": "DemoMLP", "gate": "gate_proj", "up": "up_proj", "down": "down_proj", "act": "act_fn",
                "activation": "gelu"},
        "norm": {"class": "DemoRMSNorm", "form": "llama", "eps": "eps"},
        "causal_lm": {"class": ["A", "B"], "backbone": "model", "head": "out"},
    }
    fused = spec_module.parse_spec('family = "demo"\n[mlp]\nclass = "M"\ngate_up = "w12"\n', "patches/demo.toml")
    assert fused.sections["mlp"] == {"class": "M", "gate_up": "w12", "down": "down_proj", "act": "act_fn",
                                     "activation": "silu"}


@pytest.mark.parametrize("text, message", [
    ('family = "demo"\n[mlp]\nclass = "M"\ngate_prj = "g"\n', "patches/demo.toml [mlp]: unknown keys ['gate_prj']"),
    ('family = "demo"\n[attention]\nclass = "A"\nsliding = "config"\n', "patches/demo.toml [attention]: unknown keys ['sliding']"),
    ('family = "demo"\n[norms]\nclass = "N"\n', "patches/demo.toml: unknown section [norms]"),
    ('family = "demo"\nmodel_type = ["demo"]\n', "patches/demo.toml: unknown top-level keys ['model_type']"),
    ('model_types = ["demo"]\n[mlp]\nclass = "M"\n', "patches/demo.toml: missing key 'family'"),
])
def test_unknown_or_missing_keys_are_errors_naming_file_and_section(text, message):
    with pytest.raises(ValueError) as info:
        spec_module.parse_spec(text, "patches/demo.toml")
    assert message in str(info.value)


def test_defaulted_names_missing_on_the_class_are_reported(monkeypatch):
    # phi3 without its gate_up/act lines: the defaulted gate_proj/up_proj/act_fn do not exist on Phi3MLP.
    # Gemma's norm without eps: the defaulted variance_epsilon does not exist on GemmaRMSNorm.
    cases = (
        ("phi3", '[mlp]\nclass = "Phi3MLP"\n', "mlp", "has no attribute(s) ['gate_proj', 'up_proj', 'act_fn']"),
        ("gemma", '[norm]\nclass = "GemmaRMSNorm"\nform = "gemma"\n', "norm", "no 'variance_epsilon'"),
    )
    for family, section, kind, expected in cases:
        spec = spec_module.parse_spec(f'family = "{family}"\n' + section, f"patches/{family}.toml")
        monkeypatch.setattr(spec_module, "load_specs", lambda s=spec: (s,))
        report = fastkern.patch_model(tiny_model(family), **({"norm": True} if kind == "norm" else {}))
        assert not report.patched_names(kind)
        details = [e.detail for e in report.skipped if e.kind == kind]
        assert details and all(expected in d for d in details), report


def test_contributing_shows_the_olmo2_file_as_it_is():
    root = pathlib.Path(__file__).parents[2]
    guide = (root / "CONTRIBUTING.md").read_text()
    shown = guide.split('```toml\nfamily = "olmo2"', 1)[1].split("```", 1)[0]
    assert 'family = "olmo2"' + shown == (root / "patches" / "olmo2.toml").read_text()
