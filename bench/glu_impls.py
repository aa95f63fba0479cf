"""The SwiGLU/GeGLU implementations the GLU benches compare, side by side."""

import torch
import torch.nn.functional as F

import fastkern

SHAPES = [(16384, 14336), (4096, 11008), (8192, 8192)]


def torch_glu(act):
    if act == "silu":
        return lambda g, u: F.silu(g) * u
    return lambda g, u: F.gelu(g, approximate="tanh") * u


def fastkern_glu(act, overwrite=False):
    if act == "silu":
        return lambda g, u: fastkern.ops.swiglu(g, u, overwrite_inputs_in_backward=overwrite)
    return lambda g, u: fastkern.ops.geglu(g, u, "tanh", overwrite_inputs_in_backward=overwrite)


def liger_glu(act):
    """Liger-Kernel's fused function, or None when liger_kernel is not installed."""
    try:
        if act == "silu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as fn
        else:
            from liger_kernel.ops.geglu import LigerGELUMulFunction as fn
    except Exception:
        return None
    return fn.apply


def implementations(act, with_compile=True):
    """name -> callable(gate, up). Order is the table's column order."""
    impls = {
        "fastkern": fastkern_glu(act, overwrite=True),
        "fastkern (fresh grads)": fastkern_glu(act, overwrite=False),
        "torch eager": torch_glu(act),
    }
    if with_compile:
        impls["torch.compile"] = torch.compile(torch_glu(act))
    liger = liger_glu(act)
    if liger is not None:
        impls["liger"] = liger
    return impls


def make_inputs(rows, cols, dtype, device, requires_grad=True):
    """gate/up as non-leaf views of leaves (as in an MLP, where they are activations), and grad_out."""
    g_leaf = torch.randn(rows, cols, dtype=dtype, device=device, requires_grad=requires_grad)
    u_leaf = torch.randn(rows, cols, dtype=dtype, device=device, requires_grad=requires_grad)
    dout = torch.randn(rows, cols, dtype=dtype, device=device)
    return g_leaf.view_as(g_leaf), u_leaf.view_as(u_leaf), dout


def fwd_bwd(fn, gate, up, dout):
    out = fn(gate, up)
    return torch.autograd.grad(out, (gate, up), dout)
