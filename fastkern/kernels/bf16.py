"""fp32 -> bf16 rounding for kernels that run under Triton's CPU interpreter.

The GPU converts fp32 to bf16 with round-to-nearest-even; Triton's interpreter truncates. Half of
all values then land one bf16 ulp off, a biased error that a single-element test or a gradient
GEMM turns into a failure. Launchers pass a ROUND_BF16 constexpr, set only on the interpreter path,
and the kernel rounds the bits itself before its store, so CPU results match what the GPU computes.
"""

import triton
import triton.language as tl


@triton.jit
def round_fp32_to_bf16_rtne(v):
    # Rounded to bf16 precision, still as fp32, so the following cast to bf16 is exact. NaN and inf
    # keep their class: adding < 0x8000 never carries out of the exponent of a NaN.
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to(v, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    # v (fp32) rounded to `dtype` and back, as an intermediate .to(input_dtype) in a module's forward
    # (the llama form of RMSNorm); under the interpreter (ROUND_BF16) the bf16 rounding is done here.
    if ROUND_BF16:
        return round_fp32_to_bf16_rtne(v)
    return v.to(dtype).to(tl.float32)
