"""Which execution path an op takes for a given tensor, decided per call.

Three paths exist for every op:

* ``"triton"``: the compiled Triton kernel (CUDA/ROCm tensors, triton importable);
* ``"interpreter"``: the same Triton kernel run by Triton's CPU interpreter. Triton enables it when
  ``TRITON_INTERPRET=1`` is set before ``import triton``; fastkern only reads Triton's own switch;
* ``"reference"``: the plain PyTorch implementation in :mod:`fastkern.reference`.

:func:`force_reference` makes every op in the current context take the reference path (useful to
bisect a numerical difference); it is a context variable, so threads and other models are unaffected.

:func:`path_for` runs for every kernel launch, so it remembers its answer per device type: asking
Triton for its interpreter switch is several Python calls. ``force_reference`` is read on every call,
before that cache, so it takes effect at once. Whether Triton imports and whether its interpreter is
on are read once (Triton itself decides interpreted or compiled when a kernel is defined); after
changing Triton's interpreter switch at run time, call :func:`refresh_paths`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os

import torch

_FORCE_REFERENCE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fastkern_force_reference", default=False
)


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(importable, version or the import error)."""
    try:
        triton = importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"not importable ({type(exc).__name__}: {exc})"
    return True, str(getattr(triton, "__version__", "unknown"))


def triton_available() -> bool:
    return triton_status()[0]


def interpreter_active() -> bool:
    """Whether Triton runs kernels through its interpreter (read from Triton, per call)."""
    if not triton_available():
        return False
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    # Triton < 3.4 has no knobs; it reads the variable itself at import and at launch.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# path_for's answers without force_reference, per device type; emptied by refresh_paths. Cleared in
# place, never rebound, so a module holding it sees the same dict.
_PATHS: dict[str, str] = {}


def path_for(tensor: torch.Tensor) -> str:
    """The path an op takes for inputs living on ``tensor.device``."""
    if _FORCE_REFERENCE.get():  # per call: a context variable, so no cache could follow it
        return "reference"
    device_type = tensor.device.type
    path = _PATHS.get(device_type)
    if path is None:
        path = _PATHS[device_type] = _path_for_device(device_type)
    return path


def refresh_paths() -> None:
    """Forget path_for's cached answers, and whether Triton imports: the next call asks Triton again.
    Needed only after changing Triton's interpreter switch (or its install) in a running process."""
    _PATHS.clear()
    triton_status.cache_clear()


def _path_for_device(device_type: str) -> str:
    if not triton_available():
        return "reference"
    if interpreter_active():
        if device_type in ("cpu", "cuda"):
            return "interpreter"
        return "reference"
    if device_type == "cuda":
        return "triton"
    return "reference"


@contextlib.contextmanager
def force_reference(enabled: bool = True):
    """Run every fastkern op on its PyTorch reference inside this context."""
    token = _FORCE_REFERENCE.set(enabled)
    try:
        yield
    finally:
        _FORCE_REFERENCE.reset(token)


def describe() -> dict[str, str]:
    """Versions and paths, as ``fastkern env`` prints them."""
    ok, triton_version = triton_status()
    info = {
        "torch": torch.__version__,
        "triton": triton_version,
        "interpreter (TRITON_INTERPRET)": str(interpreter_active()),
        "cuda available": str(torch.cuda.is_available()),
    }
    for name in ("transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            mod = importlib.import_module(name)
            info[name] = str(getattr(mod, "__version__", "unknown"))
        except Exception as exc:
            info[name] = f"not installed ({type(exc).__name__})"
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    info["path for cpu tensors"] = path_for(torch.empty(0))
    if torch.cuda.is_available():
        info["path for cuda tensors"] = path_for(torch.empty(0, device="cuda"))
    return info
