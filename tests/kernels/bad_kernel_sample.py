"""A kernel that reads a plain float global: the compiler rejects it; test_kernel_globals must too."""

import triton
import triton.language as tl

SCALE = 0.5


@triton.jit
def scaled_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) * SCALE)
