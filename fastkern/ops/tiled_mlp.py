"""Tiled MLP: a token-wise MLP run over row tiles, forward and backward, so that its [T, intermediate]
tensors only ever exist one tile at a time.

A decoder MLP ``down(act(gate(x)) * up(x))`` treats each token (row of x) independently, so running it
on row tiles computes exactly the same rows. Untiled, autograd keeps gate, up and the GLU output
([T, I] each) from forward to backward and backward adds their gradients: at T = 500K and I = 14336
in bf16 one such tensor is 13.4 GiB. Here:

* forward runs the MLP tile by tile under no_grad, writes each tile's rows into the output, and saves
  only x;
* backward recomputes each tile with grad enabled (same RNG state and autocast state as the forward,
  so dropout masks and dtypes match), takes ``torch.autograd.grad`` of the tile's output with the
  tile's rows of grad_out, writes the tile's rows of dX and adds the tile's parameter gradients into
  accumulators (fp32, or the parameter's dtype when wider), which are returned to autograd once.

Why parameter gradients are returned instead of letting each tile's backward accumulate into
``.grad`` (what calling ``torch.autograd.backward`` per tile would do): the outer graph then sees the
parameters as inputs of this node, so ``torch.autograd.grad(loss, params)``, ``backward(inputs=...)``,
gradient accumulation across micro-batches and post-accumulate-grad hooks behave as for any other
op: each parameter receives one gradient per call, summed over tiles in fp32 and rounded to its
dtype once, as the untiled GEMM (fp32 accumulation over all T) rounds it once. Accumulating per tile
into a bf16 ``.grad`` would round once per tile instead. Parameters that do not require grad (frozen
bases, NF4 weights) are not inputs and get nothing. Distributed wrappers (DDP, FSDP) are not covered
here: their hooks see one gradient per call, as for any op, but nothing beyond that was tested.

Costs: one extra forward of the MLP per call (the backward recompute); under gradient checkpointing
the checkpoint's recompute runs this op's forward too, so the MLP forward runs three times per step
instead of two. Memory: x, the output and dX ([T, H] each) plus one tile's intermediates.

Not traced by torch.compile (the backward calls back into the module): the patched MLP forward
(fastkern/patching/tiled_mlp.py) runs untiled while compiling.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor

from ._common import output_buffer

# Budget for ONE [tile rows, intermediate] tensor in the activation dtype. A tile's backward holds
# about four of them at once with the fused GLU (gate, up, the GLU output, its gradient; the GLU
# backward writes d(gate), d(up) over gate and up) and up to six with transformers' unfused MLP, so
# 256 MiB bounds the transient at ~1-1.5 GiB, independent of T. It still gives long GEMMs: Llama-3.1-8B
# (I = 14336, bf16) gets ~9.3K-row tiles, Llama-3.2-1B (I = 8192) ~16K rows.
DEFAULT_TILE_BYTES = 256 << 20
# Tile row counts are rounded up to this multiple (GEMM-friendly M) when a tile has more rows than it.
ROW_MULTIPLE = 64


def tile_rows(n_rows: int, intermediate: int, elem_bytes: int, budget_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """Rows per tile for ``n_rows`` tokens: the fewest tiles whose [rows, intermediate] tensor fits
    ``budget_bytes``, balanced (rows = ceil(n_rows / tiles)) so the last tile is not a sliver, rounded
    up to a multiple of 64 rows (which can only lower the tile count, and overshoots the budget by
    less than 64 rows).

    >>> tile_rows(524288, 14336, 2)   # Llama-3.1-8B MLP, bf16, 512K tokens: 57 tiles
    9216
    """
    if n_rows <= 0:
        return 1
    per_row = max(1, intermediate * elem_bytes)
    max_rows = max(1, budget_bytes // per_row)
    n_tiles = -(-n_rows // max_rows)
    rows = -(-n_rows // n_tiles)
    if rows > ROW_MULTIPLE:
        rows = -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE
    return min(rows, n_rows)


def _tile_view(rows: Tensor, lead: int) -> Tensor:
    # The MLP sees each tile as a batch of one sequence with the caller's number of dims.
    return rows.view((1,) * lead + tuple(rows.shape))


def _autocast_state(device_type: str) -> list[tuple[str, torch.dtype]]:
    """The autocast contexts active now, for ``device_type`` and CPU, to re-enter in backward."""
    states = []
    for dev in dict.fromkeys((device_type, "cpu")):
        if torch.is_autocast_enabled(dev):
            states.append((dev, torch.get_autocast_dtype(dev)))
    return states


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed(device: torch.device, rng, autocast: list, cache_enabled: bool):
    """Forward's RNG and autocast state, with grad enabled; the global RNG is restored on exit."""
    devices = [device] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=devices, device_type="cuda"))
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        stack.enter_context(torch.enable_grad())
        for dev, dtype in autocast:
            stack.enter_context(torch.autocast(dev, dtype=dtype, cache_enabled=cache_enabled))
        yield


def _run_tiles(fn: Callable[[Tensor], Tensor], x: Tensor, rows: int) -> Tensor:
    """fn over row tiles of x, under the current grad mode; the output is filled tile by tile."""
    flat = x.reshape(-1, x.shape[-1])
    n, lead = flat.shape[0], x.dim() - 2
    out = None
    for start in range(0, n, rows):
        y = fn(_tile_view(flat[start:start + rows], lead))
        y = y.reshape(-1, y.shape[-1])
        if out is None:
            out = output_buffer((n, y.shape[-1]), y.dtype, y.device)
        out[start:start + rows] = y
    return out.view(*x.shape[:-1], out.shape[-1])


class TiledMLPFunction(torch.autograd.Function):
    """Eager autograd for the tiled MLP; ``params`` are the tensors whose gradients it returns."""

    @staticmethod
    def forward(ctx, fn, x, rows, *params):
        ctx.fn, ctx.rows = fn, rows
        # Parameters are held as they are, not through save_for_backward: they are the very tensors the
        # recompute uses (as checkpointing's recompute uses the module's parameters), and saved-tensor
        # hooks (offloading, checkpointing) have nothing to gain from them.
        ctx.params = params
        ctx.rng = _rng_state(x.device)
        ctx.autocast = _autocast_state(x.device.type)
        ctx.autocast_cache = torch.is_autocast_cache_enabled()
        ctx.save_for_backward(x)
        return _run_tiles(fn, x, rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        params = ctx.needs_input_grad[3:]
        want_x = ctx.needs_input_grad[1]
        wanted = [i for i, need in enumerate(params) if need]
        param_tensors = [ctx.params[i] for i in wanted]
        flat = x.reshape(-1, x.shape[-1]).detach()
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        n, lead = flat.shape[0], x.dim() - 2
        dx = output_buffer(flat.shape, x.dtype, x.device) if want_x else None
        acc: list[Tensor | None] = [None] * len(param_tensors)
        with _replayed(x.device, ctx.rng, ctx.autocast, ctx.autocast_cache):
            for start in range(0, n, ctx.rows):
                xt = flat[start:start + ctx.rows].detach().requires_grad_(want_x)
                y = ctx.fn(_tile_view(xt, lead))
                gy = grad_flat[start:start + ctx.rows].reshape(y.shape).to(y.dtype)
                grads = torch.autograd.grad(y, ([xt] if want_x else []) + param_tensors, gy, allow_unused=True)
                if want_x:
                    dx[start:start + ctx.rows] = grads[0] if grads[0] is not None else 0
                    grads = grads[1:]
                for j, g in enumerate(grads):
                    if g is None:
                        continue
                    if acc[j] is None:
                        # A copy: autograd may hand back a tensor aliasing grad_out (e.g. for an added bias).
                        acc[j] = g.to(torch.promote_types(g.dtype, torch.float32), copy=True)
                    else:
                        acc[j].add_(g)
                del y, grads
        param_grads: list[Tensor | None] = [None] * len(params)
        for j, i in enumerate(wanted):
            if acc[j] is not None:
                param_grads[i] = acc[j].to(ctx.params[i].dtype)
        return (None, dx.view(x.shape) if want_x else None, None, *param_grads)


def tiled_mlp(fn: Callable[[Tensor], Tensor], x: Tensor, params: Sequence[Tensor] | None = None, *,
              rows: int | None = None, intermediate: int | None = None,
              budget_bytes: int = DEFAULT_TILE_BYTES) -> Tensor:
    """``fn(x)`` for a token-wise ``fn`` (a decoder MLP), computed over row tiles of x in forward and
    backward, so that fn's intermediates exist for one tile at a time.

    fn: called on tiles shaped like x with a leading batch of 1 ([1, rows, H] for a 3-D x); an
    nn.Module or any callable whose rows do not interact. params: the tensors fn uses whose gradients
    are wanted (default: fn's parameters that require grad when fn is an nn.Module). rows: rows per
    tile; by default :func:`tile_rows` from ``intermediate`` (fn's widest per-row activation; default
    4 x H) and ``budget_bytes``. Returns what fn(x) returns (same rows, dtype of fn's output).

    With grad disabled (inference, reentrant checkpointing's first pass) the tiles run without
    autograd. Gradients: x's, and each of ``params``' summed over tiles in fp32, rounded once.

    >>> import torch
    >>> from fastkern.ops.tiled_mlp import tiled_mlp
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
    >>> x = torch.randn(1, 100, 8)
    >>> torch.allclose(tiled_mlp(mlp, x, rows=16), mlp(x), atol=1e-6)
    True
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("fastkern.ops.tiled_mlp: `x` must be a tensor with at least 2 dims [..., tokens, features]")
    if params is None:
        params = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, torch.nn.Module) else []
    n_rows = x.numel() // max(x.shape[-1], 1)
    if rows is None:
        width = intermediate or 4 * x.shape[-1]
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        rows = tile_rows(n_rows, width, dtype.itemsize, budget_bytes)
    if rows < 1:
        raise ValueError(f"fastkern.ops.tiled_mlp: `rows` must be >= 1, got {rows}")
    if n_rows == 0:
        return fn(x)
    grad_needed = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    if not grad_needed:
        return _run_tiles(fn, x, rows)
    return TiledMLPFunction.apply(fn, x, rows, *params)
