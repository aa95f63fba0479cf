"""Experimental ops: correct and tested, but not part of fastkern.ops' public API and used by no patcher.

``fastkern.experimental.nf4_matmul.nf4_matmul``: the NF4 GEMM that dequantizes inside its tiles,
slower on the GPU than dequantize + matmul (docs/nf4_lora.md). Import the module by name; this
package imports nothing, so ``import fastkern`` does not register its custom ops.
"""
