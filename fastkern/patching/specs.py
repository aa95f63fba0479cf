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
    data = tomllib.loads(text)
    missing = [k for k in ("family", "model_types", "module") if k not in data]
    if missing:
        raise ValueError(f"{source}: missing keys {missing}")
    sections = {k: v for k, v in data.items() if isinstance(v, dict)}
    unknown = set(data) - _TOP_LEVEL_KEYS - set(sections)
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {sorted(unknown)}")
    return FamilySpec(
        family=data["family"],
        model_types=tuple(data["model_types"]),
        module=data["module"],
        sections=sections,
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


def supported_model_types() -> list[str]:
    return sorted({t for s in load_specs() for t in s.model_types})
