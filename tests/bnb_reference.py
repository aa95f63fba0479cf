"""bitsandbytes' NF4 dequantization as the tests' reference, through its generic PyTorch kernel.

Why not plain ``bitsandbytes.functional.dequantize_4bit``: on CPU it dispatches to bitsandbytes'
native CPU kernel when that library loads, and in bitsandbytes 0.50.2 that kernel takes the scale
block per row, which is wrong whenever a row's length is not a multiple of the blocksize (blocks then
straddle rows; 40x96 at blocksize 64: max error 2.0 against the quantized weight, seen 2026-12-03 on
the CI machine). Its generic kernel (``backends/default/ops.py``, which bitsandbytes documents as
matching its C++/CUDA kernels, and which CUDA's layout follows: one absmax per ``blocksize`` elements of
the flattened weight) is used here, with the same absmax decoding and transposition as
``dequantize_4bit``; only the 4-bit lookup is swapped.
"""

import torch

bnbf = __import__("pytest").importorskip("bitsandbytes.functional")


def bnb_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code
    except ImportError:  # an older bitsandbytes without the generic backend: its CPU path is generic
        return bnbf.dequantize_4bit(packed, state, quant_type=state.quant_type)
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float()
    flat = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    code = _get_4bit_code(state.quant_type, packed.device)
    out = _dequantize_4bit_compute(flat.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)
    return out.t() if packed.shape[0] == 1 else out

