"""Per-family patch specs: the declarative files in patches/ (package data fastkern.patches).

A spec names the transformers module of a family and, per section, the symbols fastkern replaces
and with what. Sections belong to patchers (``[mlp]`` to fastkern/patching/mlp.py, ...). Specs are
resolved against the installed transformers at patch time; a symbol that is missing becomes a
problem in the PatchReport instead of an exception.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import pathlib
import tomllib
from dataclasses import dataclass, field
from typing import Any

_TOP_LEVEL_KEYS = {"family", "model_types", "module", "description"}

# Every key a section may have, with the value the loader fills in when a family file leaves the key out
# (None: no default; the key is optional, or required and then checked by the section's patcher, which
# reports a missing one as a problem). Defaults are the names most transformers families use, so a
# family file names its classes and states only what differs. A new section or key is added here, once,
# next to the patcher that reads it; any key not listed here is an error naming the file and section.
SECTION_KEYS: dict[str, dict[str, Any]] = {
    # fastkern/patching/mlp.py and tiled_mlp.py. gate/up are not filled in when gate_up (one fused
    # [gate | up] projection) is given: see _DEFAULT_UNLESS.
    "mlp": {"class": None, "gate": "gate_proj", "up": "up_proj", "gate_up": None, "down": "down_proj",
            "act": "act_fn", "activation": "silu", "output_dropout": None},
    # fastkern/patching/attention.py (and packing.py, which reads this section too); that patcher owns
    # the defaults of its optional keys (no sliding window, per-head qk norm, half-split rope layout).
    "attention": {"class": None, "fused_qkv": None, "q_norm": None, "k_norm": None, "qk_norm_scope": None,
                  "qk_norm_if": None, "sliding_window": None, "sliding_window_if": None, "softcap": None,
                  "rope_layout": None, "rope_if": None, "sinks": None, "output_dropout": None, "clip_qkv": None},
    "packing": {"class": None},  # fastkern/patching/packing.py
    "causal_lm": {"class": None, "backbone": "model", "head": "lm_head", "router_logits": None},  # loss.py
    "norm": {"class": None, "form": "llama", "eps": "variance_epsilon"},  # fastkern/patching/norm.py
    # fastkern/patching/moe.py: an experts module with stacked gate|up and down weights ([E, 2I, H] and
    # [E, H, I], or [E, H, 2I] and [E, I, H] with transposed = true), gate/up rows concatenated or
    # interleaved (gate_up_order), optional biases, activation silu (act) or clamped_swiglu (alpha, limit).
    "moe_experts": {"class": None, "gate_up": "gate_up_proj", "down": "down_proj", "act": "act_fn",
                    "activation": "silu", "gate_up_order": None, "transposed": None, "gate_up_bias": None,
                    "down_bias": None, "alpha": None, "limit": None},
}
# (section, key) -> the key whose presence turns that default off.
_DEFAULT_UNLESS = {("mlp", "gate"): "gate_up", ("mlp", "up"): "gate_up"}


def _with_defaults(name: str, section: dict[str, Any], source: str) -> dict[str, Any]:
    """``section`` checked against SECTION_KEYS[name], its left-out keys filled in (key order: the
    file's keys, then the filled-in ones)."""
    if name not in SECTION_KEYS:
        raise ValueError(f"{source}: unknown section [{name}]; known sections: {sorted(SECTION_KEYS)}")
    keys = SECTION_KEYS[name]
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ValueError(f"{source} [{name}]: unknown keys {unknown}; allowed: {sorted(keys)}")
    filled = dict(section)
    for key, default in keys.items():
        unless = _DEFAULT_UNLESS.get((name, key))
        if default is not None and key not in filled and not (unless and unless in section):
            filled[key] = default
    return filled


@dataclass(frozen=True)
class FamilySpec:
    family: str
    model_types: tuple[str, ...]
    module: str
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""

    def resolve(self, symbol: str):
        """Import ``self.module`` and return ``symbol`` from it; raises LookupError with a clear text."""
        try:
            mod = importlib.import_module(self.module)
        except Exception as exc:
            raise LookupError(f"{self.source}: cannot import {self.module} ({type(exc).__name__}: {exc})") from None
        obj = mod
        for part in symbol.split("."):
            if not hasattr(obj, part):
                raise LookupError(f"{self.source}: {self.module}.{symbol} not found in the installed transformers")
            obj = getattr(obj, part)
        return obj


def parse_spec(text: str, source: str) -> FamilySpec:
    """One family file. ``module`` defaults to transformers.models.<family>.modeling_<family> and
    ``model_types`` to [family]; each section is checked and completed by _with_defaults."""
    data = tomllib.loads(text)
    if "family" not in data:
        raise ValueError(f"{source}: missing key 'family'")
    family = data["family"]
    sections = {k: v for k, v in data.items() if isinstance(v, dict)}
    unknown = set(data) - _TOP_LEVEL_KEYS - set(sections)
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {sorted(unknown)}")
    return FamilySpec(
        family=family,
        model_types=tuple(data.get("model_types", [family])),
        module=data.get("module", f"transformers.models.{family}.modeling_{family}"),
        sections={name: _with_defaults(name, section, source) for name, section in sections.items()},
        source=source,
    )


def _spec_dir():
    """fastkern.patches when installed; the repository's patches/ when run from a source tree."""
    try:
        return importlib.resources.files("fastkern.patches")
    except ModuleNotFoundError:
        return pathlib.Path(__file__).resolve().parents[2] / "patches"


@functools.cache
def load_specs() -> tuple[FamilySpec, ...]:
    """Every spec shipped in fastkern.patches, sorted by family."""
    specs = []
    for entry in _spec_dir().iterdir():
        if entry.name.endswith(".toml"):
            specs.append(parse_spec(entry.read_text(encoding="utf-8"), f"patches/{entry.name}"))
    return tuple(sorted(specs, key=lambda s: s.family))


def specs_for_model_type(model_type: str | None) -> list[FamilySpec]:
    if model_type is None:
        return []
    return [s for s in load_specs() if model_type in s.model_types]
