"""Differentiable collectives for sequence parallelism: an all-to-all and a sum over ranks.

    all_to_all(x, scatter_dim, gather_dim, group) -> tensor
        Splits ``x`` into ``N`` equal chunks along ``scatter_dim`` (N = ranks in ``group``), sends chunk ``j``
        to rank ``j`` and concatenates what it receives along ``gather_dim`` in rank order. Ulysses turns
        [B, H, T/N, D] into [B, H/N, T, D] with (scatter_dim=1, gather_dim=2) and back with the dims swapped.

    sum_over_ranks(x, group) -> tensor
        The sum of ``x`` over the ranks, whose backward hands each rank the incoming gradient unchanged.

Why these backwards. Write the exchange as y = P x, where x stacks every rank's input and y every rank's
output; P is a permutation of the chunks, so the gradient is dL/dx = P^T dL/dy, and P^T is the all-to-all
with scatter and gather dims swapped (chunk j of rank r went to rank j's slot r; its gradient comes back
from there). For the sum: every rank holds the same s = sum_r x_r and backpropagates the *same* scalar
objective L(s) once, from its own copy. dL/dx_r = dL/ds, which rank r already holds: the backward is the
identity. (An all-reduce backward would count the objective N times, once per rank that backpropagates it.)

The exchange uses ``dist.all_to_all_single`` (NCCL; gloo on CPU in torch 2.13, checked by the tests) and
falls back to paired send/recv for a backend that reports it has no all-to-all; each backend is tried once
per process and the answer kept.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# backend name -> True (all_to_all_single works) / False (use send/recv). Filled on first use.
_ALL_TO_ALL_SUPPORTED: dict[str, bool] = {}
EXCHANGE_METHODS = ("auto", "all_to_all_single", "send_recv")


def group_size_and_rank(group) -> tuple[int, int]:
    """(ranks in ``group``, this process's rank in it); ``group=None`` is the default (world) group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fastkern.parallel: torch.distributed is not initialized (call init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


def _exchange_send_recv(send: torch.Tensor, group) -> torch.Tensor:
    """send[j] goes to rank j; returns recv with recv[j] from rank j. Paired point-to-point ops."""
    world, rank = group_size_and_rank(group)
    recv = torch.empty_like(send)
    recv[rank].copy_(send[rank])
    ops = []
    for peer in range(world):
        if peer == rank:
            continue
        global_peer = dist.get_global_rank(group, peer) if group is not None else peer
        ops.append(dist.P2POp(dist.isend, send[peer], global_peer, group))
        ops.append(dist.P2POp(dist.irecv, recv[peer], global_peer, group))
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return recv


def _exchange(send: torch.Tensor, group, method: str = "auto") -> torch.Tensor:
    """send: [N, ...] contiguous, row j for rank j. Returns [N, ...], row j from rank j."""
    if method not in EXCHANGE_METHODS:
        raise ValueError(f"fastkern.parallel: exchange method must be one of {EXCHANGE_METHODS}, got {method!r}")
    backend = str(dist.get_backend(group))
    if method == "auto":
        method = "send_recv" if _ALL_TO_ALL_SUPPORTED.get(backend) is False else "all_to_all_single"
    if method == "send_recv":
        return _exchange_send_recv(send, group)
    recv = torch.empty_like(send)
    try:
        dist.all_to_all_single(recv, send, group=group)
    except (RuntimeError, NotImplementedError) as exc:
        # An unsupported collective fails the same way on every rank before any data moves, so all ranks
        # take the fallback together. Anything else (a peer died, a timeout) is re-raised.
        if "support" not in str(exc).lower() or backend in _ALL_TO_ALL_SUPPORTED:
            raise
        _ALL_TO_ALL_SUPPORTED[backend] = False
        return _exchange_send_recv(send, group)
    _ALL_TO_ALL_SUPPORTED[backend] = True
    return recv


def _all_to_all_forward(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, method: str) -> torch.Tensor:
    world, _ = group_size_and_rank(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(f"fastkern.parallel.all_to_all: dim {scatter_dim} of shape {tuple(x.shape)} is not "
                         f"divisible by the {world} ranks of the group")
    # [.., S, ..] -> [N, .., S/N, ..]: chunk j (the j-th block of S/N along scatter_dim) in row j.
    send = x.unflatten(scatter_dim, (world, -1)).movedim(scatter_dim, 0).contiguous()
    recv = _exchange(send, group, method)
    # recv[j] came from rank j: put the rank axis just before gather_dim and merge them, rank-major, so
    # rank j's block lands at [j * G, (j + 1) * G) along gather_dim.
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, method):
        ctx.dims, ctx.group, ctx.method = (scatter_dim, gather_dim), group, method
        return _all_to_all_forward(x, scatter_dim, gather_dim, group, method)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        # The transpose of the permutation: the same exchange with the dims swapped (module docstring).
        return _all_to_all_forward(grad, gather_dim, scatter_dim, ctx.group, ctx.method), None, None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None, *, method: str = "auto") -> torch.Tensor:
    """Differentiable all-to-all (see the module docstring). Every rank must call it with the same shape.
    ``method``: "auto" (all_to_all_single, send/recv where the backend has none), or either one forced."""
    if scatter_dim < 0:
        scatter_dim += x.dim()
    if gather_dim < 0:
        gather_dim += x.dim()
    if not (0 <= scatter_dim < x.dim() and 0 <= gather_dim < x.dim()) or scatter_dim == gather_dim:
        raise ValueError(f"fastkern.parallel.all_to_all: need two different dims of a {x.dim()}-D tensor, got "
                         f"scatter_dim={scatter_dim}, gather_dim={gather_dim}")
    return _AllToAll.apply(x, scatter_dim, gather_dim, group, method)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        total = x.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None  # identity: each rank backpropagates the shared objective once (module docstring)


def sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """sum_r x_r on every rank; backward passes the gradient through unchanged (module docstring)."""
    return _SumOverRanks.apply(x, group)
