"""Patch-time probes: before binding a fastkern forward, a patcher runs the class forward and the patched
one on a small seeded input and patches only where they agree, so a transformers release that changed
the module shows up as a skipped module with the measured error in the report, not as wrong numbers.

Each patcher builds its own inputs and says how to call its two forwards; this module holds what every
probe shares: the verdict, the modes and RNG it runs under, the tolerances and the comparison. It imports
no patcher (patchers -> context/probe).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch
import torch.nn as nn

# Relative error norm ||got - expected|| / ||expected|| (in float64) allowed between the class forward and
# the patched one, per patcher kind and probe dtype; other dtypes get DEFAULT_TOL.
PROBE_TOL: dict[str, dict[torch.dtype, float]] = {
    # Fused GLU (mlp) and grouped expert GEMMs with the fused GLU (moe).
    "mlp": {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3},
    "moe": {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3},
    # The attention forward with the fused rope (also what packing binds with the family's rotation).
    "rope": {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3},
    # The op rounds once where transformers' llama form rounds the same way; the rest is fp32 summation order.
    "norm": {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3},
    # The same forward over row tiles: only rounding differs, so float64 must agree almost exactly.
    "tiled_mlp": {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3},
}
DEFAULT_TOL = 1e-2


def tolerance(kind: str, dtype: torch.dtype) -> float:
    return PROBE_TOL[kind].get(dtype, DEFAULT_TOL)


_VERDICT_KINDS = ("ok", "not_probed", "mismatch")


@dataclass(frozen=True)
class ProbeVerdict:
    """What a probe found. ``ok``: the forwards agree, patch. ``not_probed``: nothing could be compared
    (``reason`` says why), patch and say so in the report. ``mismatch``: they differ or the patched one
    failed (``reason`` is the measured error or the exception), skip the module with the reason."""

    kind: Literal["ok", "not_probed", "mismatch"]
    reason: str = ""

    def __post_init__(self):
        if self.kind not in _VERDICT_KINDS:
            raise ValueError(f"ProbeVerdict kind must be one of {_VERDICT_KINDS}, got {self.kind!r}")

    @property
    def skips(self) -> bool:
        """Whether the module must keep its forward."""
        return self.kind == "mismatch"

    def annotate(self, detail: str) -> str:
        """The report detail of a patched module: says when the patch was not probed, and why."""
        return f"{detail} ({self.reason}; not probed)" if self.kind == "not_probed" else detail


OK = ProbeVerdict("ok")


def not_probed(reason: str) -> ProbeVerdict:
    return ProbeVerdict("not_probed", reason)


def mismatch(reason: str) -> ProbeVerdict:
    return ProbeVerdict("mismatch", reason)


class NotProbed(Exception):
    """Raised by a probe's run to turn the probe into a ``not_probed`` verdict with this message."""


def meta_skip(param: torch.Tensor | None) -> ProbeVerdict | None:
    """The verdict when there are no parameter values to run on (no parameter, or meta tensors, e.g. a
    model built under ``init_empty_weights``), else None: probe."""
    if param is None or param.device.type == "meta":
        return not_probed("parameters on the meta device")
    return None


def probe_generator() -> torch.Generator:
    """A fresh CPU generator seeded 0 for a probe's inputs: the global RNG is left as it was (a seeded
    script draws the same numbers patched or not), and drawing on the CPU (then moving to the module's
    device) keeps a surrounding ``with torch.device("meta")`` block from making the inputs meta."""
    return torch.Generator(device="cpu").manual_seed(0)


@contextlib.contextmanager
def probe_mode(module: nn.Module):
    """Modes for a patch-time probe of ``module``, restored afterwards: every submodule in eval mode
    (active dropout, e.g. PEFT's lora_dropout, would draw different masks for the original and the
    patched run, so a correct patch would measure as a mismatch, and would consume the global RNG),
    except bitsandbytes layers, which stay in training mode. In eval mode with an input that does not
    require grad, bitsandbytes' 4-bit layer on the CPU repacks its weight for its CPU kernel in place
    (and fails on widths its packing cannot tile): a probe must not change the model it inspects.
    bitsandbytes layers have no dropout, so their training flag changes nothing else in a forward."""
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        m.training = m.__class__.__module__.startswith("bitsandbytes.")
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def compare(pairs: Iterable[tuple[str | None, torch.Tensor, torch.Tensor]], tol: float,
            differs: str) -> ProbeVerdict:
    """``OK`` if every (name, got, expected) pair is within ``tol`` in relative error norm (float64), else
    the mismatch of the first that is not: "{differs}[ in {name}]: relative error {err} > {tol}"."""
    for name, got, expected in pairs:
        got, expected = got.double(), expected.double()
        err = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        if not err <= tol:  # NaN fails too
            where = f" in {name}" if name else ""
            return mismatch(f"{differs}{where}: relative error {err:.2e} > {tol:.0e}")
    return OK


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def run_probe(module: nn.Module, run_expected: Callable[[], object], run_patched: Callable[[], object],
              tol: float, *, names: Sequence[str] | None = None, differs: str | None = None,
              failure: str | None = "patched forward failed on a probe input", grad: bool = False) -> ProbeVerdict:
    """Run the class forward (``run_expected``) and the patched one (``run_patched``) of ``module`` and
    compare them with ``compare``.

    Each run returns a tensor, or a tuple of tensors named pairwise by ``names`` (e.g. an output and its
    gradients; a single unnamed output reads "differs from ..." without " in <name>"). ``differs`` opens
    the mismatch reason (default "patched forward differs from <Class>.forward"). Both run under
    ``probe_mode``, on the device of the module's tensors (factory calls inside the forwards follow
    the module, not a surrounding default device) and under no_grad, or enable_grad with ``grad`` (runs
    that take gradients: patch_model may be called under no_grad). A run raising ``NotProbed`` gives
    ``not_probed``; any other exception gives a mismatch "{failure}: {type}: {message}", or propagates
    when ``failure`` is None.
    """
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    grad_mode = torch.enable_grad() if grad else torch.no_grad()
    try:
        with probe_mode(module), grad_mode, torch.device(device):
            expected, got = _as_tuple(run_expected()), _as_tuple(run_patched())
    except NotProbed as exc:
        return not_probed(str(exc))
    except Exception as exc:
        if failure is None:
            raise
        return mismatch(f"{failure}: {type(exc).__name__}: {exc}")
    if differs is None:
        differs = f"patched forward differs from {type(module).__name__}.forward"
    labels = names if names is not None else (None,) * len(expected)
    return compare(zip(labels, got, expected), tol, differs)
