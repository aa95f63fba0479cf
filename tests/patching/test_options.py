"""patch_model's options table (fastkern/patching/options.py): documented defaults, every value checked
before anything is patched, the docstring built from the table, and the table's application order."""

import pytest

import fastkern
from fastkern.patching.checkpointing import model_offloader
from fastkern.patching.core import _patchers
from fastkern.patching.options import OPTIONS, OptionError
from tests.models import tiny_model

# The defaults and order as README and docs state them; a change here is a change to the product.
DOCUMENTED = {"mlp": True, "moe": "auto", "norm": True, "checkpointing": "recompute", "lora": True, "rope": True, "packing": True,
              "loss": True, "tiled_mlp": "auto", "compile": False}

# Values each option must refuse. Falsy ones (0, {}, "") are here on purpose: they used to be skipped as "off".
INVALID = [
    ("mlp", "yes"), ("mlp", 1),
    ("moe", "yes"), ("moe", 1), ("moe", "Auto"),
    ("norm", 0),
    ("checkpointing", {}), ("checkpointing", True), ("checkpointing", "cpu"), ("checkpointing", ""),
    ("lora", "on"),
    ("rope", 1.0),
    ("packing", "yes"),
    ("loss", [True]),
    ("tiled_mlp", 0), ("tiled_mlp", -3), ("tiled_mlp", 2.5), ("tiled_mlp", "always"),
    ("compile", "max-autotune"),
]


def _untouched(model, config_before):
    """No fastkern trace on any module, the config as it was, no offloader."""
    for name, module in model.named_modules():
        assert "forward" not in module.__dict__, name
        assert "_set_gradient_checkpointing" not in module.__dict__, name
        assert not [k for k in module.__dict__ if k.startswith("_fastkern_")], name
        assert getattr(module, "_compiled_call_impl", None) is None, name
    assert model.config.to_dict() == config_before
    assert model_offloader(model) is None


def test_defaults_are_the_documented_ones():
    assert {o.name: o.default for o in OPTIONS} == DOCUMENTED
    for option in OPTIONS:
        option.validate(option.default)  # a default is a value its own option accepts
    report = fastkern.patch_model(tiny_model("llama"), mlp=False, norm=False, rope=False, packing=False,
                                  loss=False, tiled_mlp=False)
    assert report.options == DOCUMENTED | dict(mlp=False, norm=False, rope=False, packing=False, loss=False,
                                               tiled_mlp=False)


def test_report_lists_every_option_with_its_effective_value():
    off = {name: None for name in DOCUMENTED}
    report = fastkern.patch_model(tiny_model("llama"), **off)
    assert report.options == off and not report.patched_names()


@pytest.mark.parametrize("name, value", INVALID)
def test_invalid_values_raise_before_anything_is_patched(name, value):
    model = tiny_model("llama")
    config_before = model.config.to_dict()
    # Every other option on, so a check made after patching had begun would leave traces behind.
    others = {"checkpointing": "offload", "compile": True}
    with pytest.raises(OptionError, match=f"{name}") as info:
        fastkern.patch_model(model, **(others | {name: value}))
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    _untouched(model, config_before)


def test_empty_checkpointing_dict_raises():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="checkpointing"):
        fastkern.patch_model(model, checkpointing={})
    _untouched(model, model.config.to_dict())


def test_unknown_option_leaves_the_model_untouched():
    model = tiny_model("llama")
    config_before = model.config.to_dict()
    with pytest.raises(TypeError, match="unknown option"):
        fastkern.patch_model(model, compile=True, mlpp=True)
    _untouched(model, config_before)


def test_docstring_lists_every_option_in_order_with_its_default():
    doc = fastkern.patch_model.__doc__
    positions = []
    for option in OPTIONS:
        head = f"{option.name} [{option.default!r}; {option.accepted}]:"
        assert head in doc
        positions.append(doc.index(head))
    assert positions == sorted(positions)
    assert "{options}" not in doc


def test_patchers_apply_in_the_tables_order(monkeypatch):
    assert [o.name for o in OPTIONS] == list(DOCUMENTED) == [p.option for p in _patchers()]
    applied = []
    for option in OPTIONS:
        monkeypatch.setattr(option.patcher, "apply", lambda ctx, value, name=option.name: applied.append(name))
    fastkern.patch_model(tiny_model("llama"), moe=True, checkpointing="offload", compile=True)
    assert applied == list(DOCUMENTED)
    applied.clear()
    fastkern.patch_model(tiny_model("llama"), mlp=None, rope=False)  # off values skip their patchers
    assert applied == [n for n in DOCUMENTED if n not in ("mlp", "rope", "compile")]
