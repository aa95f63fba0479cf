"""NF4 (bitsandbytes format) dequantization and quantization.

``nf4_dequantize`` reads the bytes of a bitsandbytes ``Params4bit`` (any quant_storage dtype, the
``(n, 1)`` shape or its transpose) with a ``bitsandbytes.functional.QuantState`` or fastkern's
:class:`NF4State`, and is bit-exact against bitsandbytes' own dequantization. It is one custom op
(``fastkern::nf4_dequantize``) with a fake implementation, so torch.compile traces through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
from ._common import KERNEL_DTYPES, INT32_MAX, check_tensor, device_guard

_DEQUANT_BLOCK = 2048  # weight elements per program: 1 KiB of codes in, 4 KiB of bf16 out


@dataclass(frozen=True)
class FlatNF4:
    """A validated quant state as plain tensors and ints (what the custom ops take)."""

    packed: Tensor  # flat uint8 bytes
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


def flatten_state(op: str, packed: Tensor, quant_state, dtype: torch.dtype | None = None) -> FlatNF4:
    """Validate ``packed`` + ``quant_state`` and return them as a FlatNF4 (errors name the argument)."""
    if quant_state is None:
        raise TypeError(f"{op}: `quant_state` is required for NF4-packed weights")
    quant_type = _field(op, quant_state, "quant_type")
    if quant_type != "nf4":
        raise ValueError(
            f"{op}: `quant_state.quant_type` is {quant_type!r}; only 'nf4' is supported (fp4 states must be "
            "dequantized with bitsandbytes)"
        )
    check_tensor(op, "packed", packed, dtypes=(torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32))
    shape = torch.Size(_field(op, quant_state, "shape"))
    blocksize = int(_field(op, quant_state, "blocksize"))
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{op}: `quant_state.blocksize` is {blocksize}; bitsandbytes allows {BLOCKSIZES}")
    out_dtype = dtype if dtype is not None else _field(op, quant_state, "dtype")
    if out_dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: output `dtype` {out_dtype} is not one of float16, bfloat16, float32")
    n = math.prod(shape)
    if packed.numel() * packed.element_size() != (n + 1) // 2:
        raise ValueError(
            f"{op}: `packed` holds {packed.numel() * packed.element_size()} bytes but `quant_state.shape` "
            f"{tuple(shape)} needs {(n + 1) // 2}"
        )
    flat = packed.reshape(-1)
    flat = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    code = _field(op, quant_state, "code")
    if code is None:
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=packed.device)
    check_tensor(op, "quant_state.code", code, dtypes=(torch.float32,))
    if code.numel() != 16:
        raise ValueError(f"{op}: `quant_state.code` has {code.numel()} entries; NF4 has 16")
    absmax = _field(op, quant_state, "absmax")
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
        offset = torch.as_tensor(offset, dtype=torch.float32, device=packed.device).reshape(1)
    tensors = {"quant_state.code": code, "quant_state.absmax": absmax, "quant_state.state2.absmax": absmax2,
               "quant_state.state2.code": code2, "quant_state.offset": offset}
    for name, t in tensors.items():
        if t is not None and t.device != packed.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `packed` is on {packed.device}")
    return FlatNF4(flat, code.reshape(-1), absmax.reshape(-1), None if absmax2 is None else absmax2.reshape(-1),
                   None if code2 is None else code2.reshape(-1), offset, blocksize, nested_blocksize, shape, out_dtype)


def _path(t: Tensor) -> str:
    return runtime.path_for(t)


def dequantize_into(out: Tensor, packed, code, absmax, absmax2, code2, offset, blocksize: int,
                    nested_blocksize: int, block: int = _DEQUANT_BLOCK, num_warps: int = 4) -> None:
    """Write the [rows, cols] dequantized weight into ``out`` (unit column stride, any row stride).

    ``block`` (weight elements per program, a power of two) and ``num_warps`` exist for the bench's sweep.
    """
    rows, cols = out.shape
    if out.numel() == 0:
        return
    if _path(packed) == "reference":
        scales = block_scales_reference(absmax, nested_blocksize, code2, absmax2, offset)
        out.copy_(nf4_dequantize_reference(packed, code, scales, blocksize, rows, cols, out.dtype))
        return
    from ..kernels.nf4 import nf4_dequantize_kernel

    assert out.stride(1) == 1, "dequantize_into needs a unit column stride"
    n = rows * cols
    nested = absmax2 is not None
    block = max(block, blocksize)  # a program covers whole scale blocks
    if out.stride(0) == cols:
        out_mode = 0
    elif cols % block == 0:
        out_mode = 1
    else:
        out_mode = 2
    grid = (triton_cdiv(n, block),)
    int64 = (rows - 1) * out.stride(0) + cols + 2 * block >= INT32_MAX or n + 2 * block >= INT32_MAX
    with device_guard(packed):
        nf4_dequantize_kernel[grid](
            packed, code, absmax, absmax2 if nested else absmax, code2 if nested else code,
            offset if nested else code, out,
            n, cols, out.stride(0),
            BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=max(nested_blocksize, 1),
            OUT_MODE=out_mode, ROUND_BF16=out.dtype == torch.bfloat16, BLOCK=block, INT64_OFFSETS=int64,
            num_warps=num_warps, enable_fp_fusion=False,
        )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dequantize_new(packed, code, absmax, absmax2, code2, offset, blocksize, nested_blocksize, rows, cols, dtype):
    out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
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
