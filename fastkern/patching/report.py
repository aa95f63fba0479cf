"""PatchReport: what patch_model / unpatch_model changed, skipped and could not validate."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PatchEntry:
    name: str  # module path inside the model ("" for the model itself)
    kind: str  # the patcher: "mlp", "rope", "loss", ...
    detail: str  # what was done, or why not


def _compress(names: list[str]) -> list[str]:
    """['m.layers.0.mlp', 'm.layers.1.mlp', 'm.layers.2.mlp'] -> ['m.layers.{0..2}.mlp']."""
    groups: dict[str, list[int]] = defaultdict(list)
    singles = []
    for name in names:
        m = re.search(r"\.(\d+)(\.|$)", name)
        if m is None:
            singles.append(name)
            continue
        key = name[: m.start(1)] + "{}" + name[m.end(1):]
        groups[key].append(int(m.group(1)))
    out = list(singles)
    for key, idx in groups.items():
        idx = sorted(idx)
        if len(idx) == 1:
            out.append(key.replace("{}", str(idx[0])))
        elif idx == list(range(idx[0], idx[-1] + 1)):
            out.append(key.replace("{}", f"{{{idx[0]}..{idx[-1]}}}"))
        else:
            out.append(key.replace("{}", "{" + ",".join(map(str, idx)) + "}"))
    return out


@dataclass
class PatchReport:
    model: str
    family: str | None
    action: str = "patch"
    options: dict = field(default_factory=dict)
    patched: list[PatchEntry] = field(default_factory=list)
    skipped: list[PatchEntry] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # specs that did not validate
    notes: list[str] = field(default_factory=list)

    def add_patched(self, name: str, kind: str, detail: str) -> None:
        self.patched.append(PatchEntry(name, kind, detail))

    def add_skipped(self, name: str, kind: str, reason: str) -> None:
        self.skipped.append(PatchEntry(name, kind, reason))

    def patched_names(self, kind: str | None = None) -> list[str]:
        return [e.name for e in self.patched if kind is None or e.kind == kind]

    @staticmethod
    def _lines(entries: list[PatchEntry]) -> list[str]:
        grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
        for e in entries:
            grouped[(e.kind, e.detail)].append(e.name or "<model>")
        return [f"    {kind:<6} {', '.join(_compress(names))}: {detail}" for (kind, detail), names in grouped.items()]

    def __str__(self) -> str:
        verb = "patched" if self.action == "patch" else "restored"
        head = f"fastkern {self.action} of {self.model} (family: {self.family or 'unknown'})"
        lines = [head, f"  {verb} ({len(self.patched)}):"]
        lines += self._lines(self.patched) or ["    nothing"]
        lines.append(f"  skipped ({len(self.skipped)}):")
        lines += self._lines(self.skipped) or ["    nothing"]
        if self.problems:
            lines.append(f"  spec problems ({len(self.problems)}):")
            lines += [f"    {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__
