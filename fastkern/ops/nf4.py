"""NF4 (bitsandbytes format) dequantization and quantization.

``nf4_dequantize`` reads the bytes of a bitsandbytes ``Params4bit`` (any quant_storage dtype, the
``(n, 1)`` shape or its transpose) with a ``bitsandbytes.functional.QuantState`` or fastkern's
:class:`NF4State`, and is bit-exact against bitsandbytes' own dequantization. It is one custom op
(``fastkern::nf4_dequantize``) with a fake implementation, so torch.compile traces through it.
"""

from __future__ import annotations

import math
import operator
import weakref
from typing import NamedTuple

import torch
from torch import Tensor

from .. import runtime
from ..reference.nf4 import (  # noqa: F401  (NF4State is re-exported)
    BLOCKSIZES,
    NF4_CODE,
    NF4State,
    block_scales_reference,
    nf4_dequantize_reference,
    nf4_quantize_reference,
)
from ._common import INT32_MAX, KERNEL_DTYPES, cdiv, check_tensor, device_guard, output_buffer

# Weight elements per program and warps: 2048 elements = 1 KiB of codes in, 4 KiB of bf16 out, two
# warps. Among the best of the bench/cases/nf4.py sweep with double quantization on the H100 (2048 to
# 8192 elements with 2 or 4 warps all 0.056-0.057 ms for 14336x4096; 8 warps at 1024 elements 0.091)
# and on the H200 (docs/benchmarks.md has the numbers).
_DEQUANT_BLOCK = 2048
_DEQUANT_WARPS = 2


class FlatNF4(NamedTuple):
    """A validated quant state as plain tensors and ints (what the custom ops take).

    A NamedTuple rather than a dataclass: one is built per call (only ``packed`` changes), which
    costs a NamedTuple about a microsecond.
    """

    packed: Tensor | None  # flat uint8 bytes (None in the per-state cache entry)
    code: Tensor
    absmax: Tensor
    absmax2: Tensor | None
    code2: Tensor | None
    offset: Tensor | None
    blocksize: int
    nested_blocksize: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def rows_cols(self) -> tuple[int, int]:
        return (math.prod(self.shape[:-1]), self.shape[-1]) if len(self.shape) else (1, 1)


def _field(op: str, state, name: str):
    if not hasattr(state, name):
        raise TypeError(
            f"{op}: `quant_state` ({type(state).__name__}) has no field {name!r}; pass a "
            "bitsandbytes QuantState or fastkern.ops.NF4State"
        )
    return getattr(state, name)


_PACKED_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
_STATE_FIELDS = ("quant_type", "shape", "blocksize", "dtype", "code", "absmax", "offset", "state2")
_NESTED_FIELDS = ("absmax", "code", "blocksize")


def _check_packed_size(op: str, nbytes: int, shape: torch.Size) -> None:
    need = (math.prod(shape) + 1) // 2
    if nbytes != need:
        raise ValueError(f"{op}: `packed` holds {nbytes} bytes but `quant_state.shape` {tuple(shape)} needs {need}")


def _validate_state(op: str, quant_state, dtype: torch.dtype | None, packed_nbytes: int) -> FlatNF4:
    """Check every field of ``quant_state`` (errors name the field); ``packed`` is left None.

    ``packed_nbytes`` is checked against the shape before the other fields, so a shape that does not
    fit the packed weight is reported as that rather than as a wrong absmax length.
    """
    if quant_state is None:
        raise TypeError(f"{op}: `quant_state` is required for NF4-packed weights")
    quant_type = _field(op, quant_state, "quant_type")
    if quant_type != "nf4":
        raise ValueError(
            f"{op}: `quant_state.quant_type` is {quant_type!r}; only 'nf4' is supported (fp4 states must be "
            "dequantized with bitsandbytes)"
        )
    shape = torch.Size(_field(op, quant_state, "shape"))
    blocksize = int(_field(op, quant_state, "blocksize"))
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{op}: `quant_state.blocksize` is {blocksize}; bitsandbytes allows {BLOCKSIZES}")
    out_dtype = dtype if dtype is not None else _field(op, quant_state, "dtype")
    if out_dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: output `dtype` {out_dtype} is not one of float16, bfloat16, float32")
    _check_packed_size(op, packed_nbytes, shape)
    n = math.prod(shape)
    absmax = _field(op, quant_state, "absmax")
    check_tensor(op, "quant_state.absmax", absmax, dtypes=(torch.float32, torch.uint8))
    device = absmax.device
    code = _field(op, quant_state, "code")
    if code is None:
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    check_tensor(op, "quant_state.code", code, dtypes=(torch.float32,))
    if code.numel() != 16:
        raise ValueError(f"{op}: `quant_state.code` has {code.numel()} entries; NF4 has 16")
    blocks = -(-n // blocksize)
    state2 = _field(op, quant_state, "state2")
    if absmax.numel() != blocks:
        raise ValueError(f"{op}: `quant_state.absmax` has {absmax.numel()} entries; shape and blocksize need {blocks}")
    if state2 is None:
        check_tensor(op, "quant_state.absmax", absmax, dtypes=(torch.float32,))
        absmax2 = code2 = offset = None
        nested_blocksize = 0
    else:
        check_tensor(op, "quant_state.absmax", absmax, dtypes=(torch.uint8,))
        absmax2, code2 = _field(op, state2, "absmax"), _field(op, state2, "code")
        nested_blocksize = int(_field(op, state2, "blocksize"))
        check_tensor(op, "quant_state.state2.absmax", absmax2, dtypes=(torch.float32,))
        check_tensor(op, "quant_state.state2.code", code2, dtypes=(torch.float32,))
        if code2.numel() != 256:
            raise ValueError(f"{op}: `quant_state.state2.code` has {code2.numel()} entries; the 8-bit map has 256")
        if absmax2.numel() != -(-blocks // nested_blocksize):
            raise ValueError(
                f"{op}: `quant_state.state2.absmax` has {absmax2.numel()} entries; {blocks} blocks in groups of "
                f"{nested_blocksize} need {-(-blocks // nested_blocksize)}"
            )
        offset = _field(op, quant_state, "offset")
        offset = torch.as_tensor(offset, dtype=torch.float32, device=device).reshape(1)
    tensors = {"quant_state.code": code, "quant_state.state2.absmax": absmax2,
               "quant_state.state2.code": code2, "quant_state.offset": offset}
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `quant_state.absmax` is on {device}")
    return FlatNF4(None, _flat(code), _flat(absmax), None if absmax2 is None else _flat(absmax2),
                   None if code2 is None else _flat(code2), offset, blocksize, nested_blocksize, shape, out_dtype)


def _flat(t: Tensor) -> Tensor:
    """``t`` as a dense 1-D tensor: the kernels index the quant-state vectors (and the packed bytes) as
    flat memory from their first element. A strided one is copied (a view when it is already dense):
    these are small state vectors, or packed bytes that only an unusual caller hands over strided,
    and reading them as flat would dequantize the wrong bytes."""
    t = t.reshape(-1)
    # Not .contiguous(): it keeps a one-element tensor's odd stride, which a dtype view rejects.
    return t if t.stride(0) == 1 else t.clone(memory_format=torch.contiguous_format)


# Validated states, keyed by id(quant_state): (weakref to the state, a getter of its fields, the
# field objects the entry was built from, those of them that are tensors, their data pointers, the
# FlatNF4 per dtype). A hit needs the same state object whose fields are still the same objects over
# the same memory (bitsandbytes' QuantState.to() and `.data =` swaps change one or the other), so a
# moved or edited state is validated again. The cached tensors are views of the state's own tensors
# (entries whose flattening had to copy are not cached), so in-place edits of their contents are
# seen too. An entry dies with its state. The hit test runs for every NF4 call (every QLoRA
# projection, forward and backward), so it is C calls only: one attrgetter, then map over the fields.
_STATE_CACHE: dict[int, tuple] = {}
_FIELDS_GETTER = operator.attrgetter(*_STATE_FIELDS)
_NESTED_FIELDS_GETTER = operator.attrgetter(*_STATE_FIELDS, *("state2." + name for name in _NESTED_FIELDS))
_data_ptr = Tensor.data_ptr


def _state_fields(quant_state) -> list:
    fields = [getattr(quant_state, name, None) for name in _STATE_FIELDS]
    state2 = fields[-1]
    if state2 is not None:
        fields += [getattr(state2, name, None) for name in _NESTED_FIELDS]
    return fields


def _same_fields(quant_state, entry) -> bool:
    """Whether ``quant_state`` still has the field objects of the cache entry, over the same memory."""
    _, getter, fields, tensors, ptrs, _ = entry
    try:
        now = getter(quant_state)
    except AttributeError:  # a field was deleted (or state2 became None): validate again
        return False
    return all(map(operator.is_, now, fields)) and tuple(map(_data_ptr, tensors)) == ptrs


def _shares_memory(flat: FlatNF4, fields: list) -> bool:
    """Whether every cached tensor is a view of the state's own tensor (a Python-number offset or a
    missing code, turned into new tensors, are immutable sources and pass)."""
    state2 = len(fields) > len(_STATE_FIELDS)
    pairs = [(fields[4], flat.code), (fields[5], flat.absmax), (fields[6], flat.offset)]
    if state2:
        pairs += [(fields[8], flat.absmax2), (fields[9], flat.code2)]
    return all(not isinstance(src, Tensor) or src.data_ptr() == t.data_ptr() for src, t in pairs)


def validated_state(op: str, quant_state, dtype: torch.dtype | None, packed_nbytes: int) -> FlatNF4:
    """``_validate_state`` once per (state object, dtype) while the state's fields stay the same."""
    if torch.compiler.is_compiling():  # traced once per graph; no cache (dynamo cannot trace data pointers)
        return _validate_state(op, quant_state, dtype, packed_nbytes)
    key = id(quant_state)
    entry = _STATE_CACHE.get(key)
    if entry is not None and entry[0]() is quant_state and _same_fields(quant_state, entry):
        flats = entry[-1]
        flat = flats.get(dtype)
        if flat is None:
            flat = flats[dtype] = _validate_state(op, quant_state, dtype, packed_nbytes)
        return flat
    flat = _validate_state(op, quant_state, dtype, packed_nbytes)
    fields = _state_fields(quant_state)
    if _shares_memory(flat, fields):
        try:
            ref = weakref.ref(quant_state, lambda _, key=key: _STATE_CACHE.pop(key, None))
        except TypeError:  # not weak-referenceable: validate on every call
            return flat
        getter = _FIELDS_GETTER if len(fields) == len(_STATE_FIELDS) else _NESTED_FIELDS_GETTER
        tensors = tuple(f for f in fields if isinstance(f, Tensor))
        _STATE_CACHE[key] = (ref, getter, tuple(fields), tensors, tuple(map(_data_ptr, tensors)), {dtype: flat})
    return flat


def flatten_state(op: str, packed: Tensor, quant_state, dtype: torch.dtype | None = None) -> FlatNF4:
    """Validate ``packed`` + ``quant_state`` and return them as a FlatNF4 (errors name the argument).

    The quant state's checks run once per state object (see ``validated_state``); the packed
    tensor's dtype, size and device are checked on every call. The returned ``packed`` is a plain
    tensor (a view of ``packed``).
    """
    if packed.__class__ is not Tensor:
        # bitsandbytes' Params4bit defines __torch_function__ in Python, which then runs for every
        # attribute read and op on it (seven Python calls per QLoRA call, and more downstream). Its
        # only special cases are chunk and split; everything read here is the plain tensor's.
        with torch._C.DisableTorchFunctionSubclass():
            return _flatten(op, packed, quant_state, dtype)
    return _flatten(op, packed, quant_state, dtype)


def _flatten(op: str, packed: Tensor, quant_state, dtype: torch.dtype | None) -> FlatNF4:
    check_tensor(op, "packed", packed, dtypes=_PACKED_DTYPES)
    nbytes = packed.numel() * packed.element_size()
    flat = validated_state(op, quant_state, dtype, nbytes)
    _check_packed_size(op, nbytes, flat.shape)  # again: a cache hit skipped the check inside
    if packed.device != flat.absmax.device:
        raise ValueError(f"{op}: `packed` is on {packed.device} but `quant_state.absmax` is on {flat.absmax.device}")
    # Dense first: the kernels address the bytes as flat memory, and viewing another quant_storage dtype
    # as bytes needs a unit stride.
    packed = _flat(packed)
    return FlatNF4(packed if packed.dtype == torch.uint8 else packed.view(torch.uint8), *flat[1:])


_dequant_kernel = None  # kernels.nf4.nf4_dequantize_kernel, once imported


def dequantize_into(out: Tensor, packed, code, absmax, absmax2, code2, offset, blocksize: int,
                    nested_blocksize: int, block: int = _DEQUANT_BLOCK, num_warps: int = _DEQUANT_WARPS,
                    store_cache: str = "") -> None:
    """Write the [rows, cols] dequantized weight into ``out`` (unit column stride, any row stride).

    ``block`` (weight elements per program, a power of two), ``num_warps`` and ``store_cache`` (the
    stores' cache modifier, "" or ".cs") exist for the bench's sweep.
    """
    rows, cols = out.shape
    if out.numel() == 0:
        return
    path = runtime.path_for(packed)  # once: each call is several Python calls, and this runs per QLoRA GEMM
    if path == "reference":
        scales = block_scales_reference(absmax, nested_blocksize, code2, absmax2, offset)
        out.copy_(nf4_dequantize_reference(packed, code, scales, blocksize, rows, cols, out.dtype))
        return
    global _dequant_kernel
    if _dequant_kernel is None:  # imported on first use: the reference path runs without Triton
        from ..kernels.nf4 import nf4_dequantize_kernel as _dequant_kernel

    assert out.stride(1) == 1, "dequantize_into needs a unit column stride"
    n = rows * cols
    nested = absmax2 is not None
    block = max(block, blocksize)  # a program covers whole scale blocks
    if out.stride(0) != cols:
        # Strided rows: a block that divides the row keeps each program inside one row (mode 1)
        # instead of a division per element (mode 2).
        while block > blocksize and cols % block:
            block //= 2
    if out.stride(0) == cols:
        out_mode = 0
    elif cols % block == 0:
        out_mode = 1
    else:
        out_mode = 2
    grid = (-(-n // block),)  # cdiv, inline: this runs per QLoRA GEMM
    int64 = (rows - 1) * out.stride(0) + cols + 2 * block >= INT32_MAX or n + 2 * block >= INT32_MAX
    # The GPU's fp32->bf16 conversion already rounds to nearest even; the interpreter truncates, so
    # there the kernel rounds on the bits itself (bit-exactness is tested on CPU).
    round_by_hand = out.dtype == torch.bfloat16 and path == "interpreter"
    with device_guard(packed):
        _dequant_kernel[grid](
            packed, code, absmax, absmax2 if nested else absmax, code2 if nested else code,
            offset if nested else code, out,
            n, cols, out.stride(0),
            BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=max(nested_blocksize, 1),
            OUT_MODE=out_mode, ROUND_BF16=round_by_hand, BLOCK=block, INT64_OFFSETS=int64, EVEN=n % block == 0,
            STORE_CACHE=store_cache, num_warps=num_warps, enable_fp_fusion=False,
        )


def _dequantize_new(packed, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize, rows, cols, dtype):
    out = output_buffer((rows, cols), dtype, packed.device)
    dequantize_into(out, packed, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize)
    return out


@torch.library.custom_op("fastkern::nf4_dequantize", mutates_args=())
def nf4_dequantize_op(
    packed: Tensor, code: Tensor, absmax: Tensor, absmax2: Tensor | None, code2: Tensor | None,
    offset: Tensor | None, blocksize: int, nested_blocksize: int, rows: int, cols: int, dtype: torch.dtype,
) -> Tensor:
    return _dequantize_new(packed, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize, rows, cols,
                           dtype)


@nf4_dequantize_op.register_fake
def _(packed, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize, rows, cols, dtype):
    return packed.new_empty((rows, cols), dtype=dtype)


def dequantize_flat(s: FlatNF4) -> Tensor:
    rows, cols = s.rows_cols
    args = (s.packed, s.code, s.absmax, s.absmax2, s.code2, s.offset, s.blocksize, s.nested_blocksize, rows, cols,
            s.dtype)
    if torch.compiler.is_compiling():
        return nf4_dequantize_op(*args)
    # Eager: call the implementation directly. The custom op's Python dispatch costs tens of
    # microseconds, as much as the kernel itself (0.06 ms for a 14336x4096 weight).
    return _dequantize_new(*args)


def nf4_dequantize(packed: Tensor, quant_state, *, dtype: torch.dtype | None = None) -> Tensor:
    """Dequantize a bitsandbytes NF4 weight; bit-exact against ``bitsandbytes.functional.dequantize_4bit``.

    packed: the packed bytes (uint8 or another quant_storage dtype viewing the same bytes), shape
    ``((n + 1) // 2, 1)`` as bitsandbytes stores it, or its transpose ``(1, ...)``: as in bitsandbytes,
    the transposed form returns the weight transposed. quant_state: a bitsandbytes ``QuantState`` or a
    :class:`NF4State` (nested / double-quantized or not, any blocksize bitsandbytes allows).
    dtype: output dtype (default ``quant_state.dtype``).

    >>> import torch, fastkern
    >>> w = torch.randn(8, 64)
    >>> packed, state = fastkern.ops.nf4_quantize(w)
    >>> fastkern.ops.nf4_dequantize(packed, state).shape
    torch.Size([8, 64])
    """
    op = "fastkern.ops.nf4_dequantize"
    s = flatten_state(op, packed, quant_state, dtype)
    out = dequantize_flat(s).view(s.shape)
    if packed.dim() == 2 and packed.shape[0] == 1:
        return out.t()
    return out


def nf4_quantize(weight: Tensor, *, blocksize: int = 64, double_quant: bool = True) -> tuple[Tensor, NF4State]:
    """Quantize ``weight`` to NF4 in bitsandbytes' format: ``(packed uint8 [(n + 1) // 2, 1], NF4State)``.

    double_quant=True quantizes the absmax vector too (bitsandbytes' ``compress_statistics``).
    Runs in PyTorch (quantization is done once, offline); ``nf4_dequantize`` of the result equals
    bitsandbytes' dequantization of the same bytes.
    """
    op = "fastkern.ops.nf4_quantize"
    check_tensor(op, "weight", weight, dtypes=KERNEL_DTYPES)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{op}: `blocksize` is {blocksize}; bitsandbytes allows {BLOCKSIZES}")
    if weight.numel() == 0:
        raise ValueError(f"{op}: `weight` is empty")
    return nf4_quantize_reference(weight, blocksize, bool(double_quant))
