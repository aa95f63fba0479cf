"""Argument checks and layout helpers shared by the ops. Errors name the op and the argument."""

from __future__ import annotations

import contextlib

import torch

from .. import runtime

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT32_MAX = 2**31 - 1


# Output poisoning, a debugging switch (off by default; the test suite turns it on for every test, see
# tests/conftest.py): when on, every buffer an op allocates for a kernel to fill comes pre-filled with
# NaN (integers: a sentinel), so an element a kernel forgets to write shows in the comparison instead of
# passing with whatever the allocator left there. Off, an allocation costs one global bool check.
_poison_outputs = False
POISON_INT = -7


def set_output_poisoning(on: bool) -> bool:
    """Turn output poisoning on or off for this process; returns the previous setting."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, bool(on)
    return previous


def output_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device), for a buffer a kernel writes in full: an op's
    output, gradient or per-row statistic. Poisoned when set_output_poisoning(True) is on. Accumulators
    a kernel adds into start from torch.zeros instead, and are not allocated through here."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs:
        poison_(out)
    return out


def output_like(t: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(t) (t's strides when t is dense), for a buffer a kernel writes in full; poisoned
    as output_buffer's are."""
    out = torch.empty_like(t)
    if _poison_outputs:
        poison_(out)
    return out


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill t with NaN (floating and complex dtypes) or POISON_INT (integers); bools are left as they are."""
    if t.numel():
        if t.dtype.is_floating_point or t.dtype.is_complex:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(POISON_INT)
    return t


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host ints, for launch grids (triton.cdiv needs triton imported; the reference
    path runs without it)."""
    return -(-a // b)


def op_path(t: torch.Tensor) -> str:
    """The path an op takes for `t` (fastkern.runtime.path_for), except that float64 always takes the
    reference: the kernels have no float64 variant, and float64 is how the tests ask for the oracle."""
    return "reference" if t.dtype == torch.float64 else runtime.path_for(t)


def check_tensor(op: str, name: str, t, *, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if type(t).__name__ == "DTensor":  # name check: no torch.distributed import on this hot path
        raise TypeError(f"{op}: `{name}` is a DTensor (a sharded parameter); pass a plain tensor, e.g. its "
                        f"full_tensor() or the unsharded parameter inside the FSDP unit's forward")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: `{name}` has dtype {t.dtype}; supported dtypes: {allowed}")


def check_like(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor, *, shape=True) -> None:
    """`t` must match `ref` in device, dtype and (optionally) shape."""
    if t.device != ref.device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `{ref_name}` has dtype {ref.dtype}; cast one of them")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{op}: `{name}` has shape {tuple(t.shape)} but `{ref_name}` has shape {tuple(ref.shape)}")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [rows, cols] view of `t` over its last dim, with arbitrary row and column strides.

    Leading dims that cannot be merged into one stride (e.g. a permuted 3-D view) are copied; that
    is the only case that copies, and it is correct either way.
    """
    if t.dim() == 0:
        return t.reshape(1, 1)
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def reach(shape, strides, slack: int = 0) -> int:
    """Bound on the element offsets a launch forms for a tensor of this shape and strides: its last
    element, plus `slack` steps of its largest stride for masked lanes past the end. Only dims longer
    than 1 count: a size-1 dim is never stepped, and its stride can be anything (the batch stride of
    a B=1 projection, the row stride of a one-row view), which sent long single-row launches to the
    int64 variant for nothing. Takes stride tuples so a launcher that already read them reads them once."""
    last = widest = 0
    for n, st in zip(shape, strides):  # a plain loop: launchers call this for several tensors per launch
        if n > 1:
            st = abs(st)
            last += (n - 1) * st
            widest = st if st > widest else widest
    return last + slack * (widest or 1)


def needs_int64(*tensors: torch.Tensor, slack: int = 0) -> bool:
    """Whether int32 offsets could overflow for any operand (`slack`: extra reach of masked lanes)."""
    for t in tensors:  # a loop, not any(<generator>): a Python call per tensor less, on every launch
        if reach(t.shape, t.stride(), slack) >= INT32_MAX:
            return True
    return False


_NO_GUARD = contextlib.nullcontext()
# Whether this process sees more than one GPU, read at the first CUDA launch (the count is fixed once
# CUDA is initialized, which a CUDA tensor implies). With one GPU every CUDA tensor is on the current
# device, so the launch needs no device query: torch.cuda.current_device() is three Python calls.
_several_gpus: bool | None = None


def device_guard(t: torch.Tensor):
    """Launch on the tensor's device (and so on that device's current stream). When that device is
    already the current one (the common case) no guard is entered: switching and restoring the
    device costs host time on every launch, and Triton launches on the current device."""
    if t.is_cuda:
        global _several_gpus
        several = _several_gpus
        if several is None:
            several = _several_gpus = torch.cuda.device_count() > 1
        if several:
            index = t.get_device()
            if index != torch.cuda.current_device():
                return torch.cuda.device(index)
    return _NO_GUARD
