"""Reference NF4 (bitsandbytes format) quantization and dequantization in plain PyTorch.

Layout (bitsandbytes 0.4x-0.50): a weight of shape S is flattened row-major into n elements; element
2j sits in the HIGH nibble of byte j and element 2j+1 in its low nibble (a trailing half byte is 0).
Each run of ``blocksize`` elements has one fp32 absmax; value = NF4_CODE[nibble] * absmax, computed
in fp32 and then cast to the output dtype (so results are bit-exact against bitsandbytes).

Double quantization ("nested"): the absmax vector minus its mean (``offset``) is itself quantized to
uint8 with bitsandbytes' 8-bit dynamic map in blocks of 256; absmax = fp32(code2[q] * absmax2[i // 256])
+ offset, each step rounded to fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The 16 NF4 levels (quantiles of N(0, 1) rescaled to [-1, 1]), index = nibble.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
# Elements per step of the references' loops: a multiple of every blocksize (whole blocks, whole bytes),
# small enough that the temporaries stay near 1 GB.
REFERENCE_CHUNK = 2**25


@dataclass
class NF4State:
    """fastkern's quant state; the same fields as ``bitsandbytes.functional.QuantState``."""

    absmax: torch.Tensor  # fp32 [blocks], or uint8 [blocks] when nested
    shape: torch.Size
    code: torch.Tensor  # fp32 [16]
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    offset: torch.Tensor | None = None  # fp32 scalar, nested only
    state2: "NF4State | None" = None  # absmax2 (fp32 [blocks / 256]) and the 8-bit code (fp32 [256])
    nested: bool = field(default=False)

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        self.nested = self.state2 is not None


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (7 exponent decades of linear fractions), sorted.

    Decade i (0..6) contributes the 2**i midpoints of linspace(0.1, 1, 2**i + 1), scaled by
    10**(i - 6), with both signs; plus 0 and 1: 2 * 127 + 2 = 256 levels. Arithmetic in fp32 as the
    original, so the table is bit-identical.
    """
    values: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (i - 6)) * mids).tolist()
        values += (-(10 ** (i - 6)) * mids).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, flat scaled to [-1, 1]) with a short last block handled like the rest."""
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n))
    absmax = padded.view(blocks, blocksize).abs().amax(dim=1)
    scaled = (padded.view(blocks, blocksize) * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1)
    return absmax, scaled.reshape(-1)[:n]


def _nearest_level(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    # Ties go to the upper level: bucketize(right=False) against the midpoints of the sorted code.
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


def nf4_quantize_reference(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """(packed uint8 [(n + 1) // 2, 1], NF4State) in bitsandbytes' layout."""
    flat = weight.detach().reshape(-1)
    code = nf4_code(weight.device)
    n = flat.numel()
    # Whole blocks per chunk (REFERENCE_CHUNK is a multiple of every blocksize): the fp32 temporaries
    # stay bounded whatever the weight's size.
    absmax_parts, packed_parts = [], []
    for start in range(0, n, REFERENCE_CHUNK):
        absmax_chunk, scaled = _blockwise_absmax(flat[start:start + REFERENCE_CHUNK].float(), blocksize)
        # An odd count is padded with the code of 0.0 (nibble 7), as bitsandbytes does (only the last
        # chunk can be odd).
        q = _nearest_level(torch.nn.functional.pad(scaled, (0, scaled.numel() % 2)), code)
        absmax_parts.append(absmax_chunk)
        packed_parts.append((q[0::2] << 4) | q[1::2])
    absmax = torch.cat(absmax_parts)
    packed = torch.cat(packed_parts).unsqueeze(1)
    if not double_quant:
        return packed, NF4State(absmax, weight.shape, code, weight.dtype, blocksize)
    offset = absmax.mean()
    code2 = dynamic_map_signed().to(weight.device)
    absmax2, scaled2 = _blockwise_absmax(absmax - offset, NESTED_BLOCKSIZE)
    qabsmax = _nearest_level(scaled2, code2)
    state2 = NF4State(absmax2, absmax.shape, code2, torch.float32, NESTED_BLOCKSIZE, quant_type="dynamic")
    return packed, NF4State(qabsmax, weight.shape, code, weight.dtype, blocksize, offset=offset, state2=state2)


def block_scales_reference(absmax, blocksize2, code2, absmax2, offset) -> torch.Tensor:
    """The fp32 absmax per block; for a nested state, undoes the 8-bit quantization first."""
    if code2 is None:
        return absmax.float()
    idx = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
    return code2[absmax.long()] * absmax2[idx] + offset.float()


def nf4_dequantize_reference(packed_bytes, code, scales, blocksize, n_rows, n_cols, dtype) -> torch.Tensor:
    """packed_bytes: flat uint8; scales: fp32 absmax per block. Returns [n_rows, n_cols] in dtype.

    Works on REFERENCE_CHUNK elements at a time: the int64 nibble and block indices and the fp32
    products would otherwise cost ~30 bytes per element (~65 GB for a 2**31-element weight).
    """
    n = n_rows * n_cols
    out = torch.empty(n, dtype=dtype, device=packed_bytes.device)
    for start in range(0, n, REFERENCE_CHUNK):  # REFERENCE_CHUNK is even: chunks start on a byte
        stop = min(n, start + REFERENCE_CHUNK)
        chunk = packed_bytes[start // 2:(stop + 1) // 2]
        nibbles = torch.stack([chunk >> 4, chunk & 15], dim=1).reshape(-1)[:stop - start].long()
        block = torch.arange(start, stop, device=packed_bytes.device) // blocksize
        out[start:stop] = (code[nibbles] * scales[block]).to(dtype)
    return out.view(n_rows, n_cols)


def nf4_matmul_reference(x, packed_bytes, code, scales, blocksize, n_rows, n_cols, transpose) -> torch.Tensor:
    """x [M, R] @ W.T (R = n_cols) or, with ``transpose``, x @ W (R = n_rows), W [n_rows, n_cols] NF4.

    W is dequantized as ``nf4_dequantize_reference`` does, into x's dtype (fp32 for fp64 x: the
    values are exact fp32 products, then promoted), and multiplied by torch in x's dtype.
    """
    w_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    w = nf4_dequantize_reference(packed_bytes, code, scales, blocksize, n_rows, n_cols, w_dtype).to(x.dtype)
    return x @ (w if transpose else w.t())
