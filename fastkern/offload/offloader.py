"""Gradient checkpointing whose saved inputs wait in CPU memory, copied on a side stream.

Non-reentrant ``torch.utils.checkpoint`` keeps only the tensor arguments of a checkpointed call and
recomputes everything else in backward. It saves those arguments through autograd's saved-tensor
mechanism *before* it installs its own hooks, so a ``saved_tensors_hooks`` context put around the call
sees exactly them (one hidden state per decoder layer) and nothing computed inside the function. The
reentrant checkpoint (``ActivationOffloader.recompute``, what ``checkpointing="offload"`` uses) saves the
same arguments when its call returns; there the copies are started before the call (see ``recompute``).

:class:`ActivationOffloader` is that context plus the memory behind it:

* pack (forward): a side stream waits for the current stream, copies the tensor into a pinned host
  buffer and records an event. When the checkpointed call returns (its forward kernels queued), the
  current stream waits on that event and the device tensor is dropped, so its memory goes back to the
  current stream's pool in stream order, reusable by the very next kernel. (``record_stream`` would
  keep it unusable until the allocator happens to poll the event as complete, which, with the CPU
  running ahead of the GPU, is several layers later: measured, it cost two thirds of the saving.)
* unpack (backward): the current stream waits on the event of the copy back, which had usually been
  started already: unpacking item k starts the copy of item k-1, the input of the layer whose backward
  comes next. The CPU thread never waits (with pinned memory); the compute stream waits only on
  copies it needs, and stalls only if copying a layer's input takes longer than computing the layer.
* host buffers come from a pool owned by the offloader (one per patched model), go back to it when
  autograd frees the saved tensor, and a copy into a reused buffer first waits for the last copy that
  touched it, so no buffer is overwritten while a copy reads it.

Streams are looked up when each copy is issued (the current stream of the tensor's device at that
moment), never captured earlier.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import warnings
import weakref
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from .pool import HostBufferPool, _available_host_bytes, _HostBuffer

# Saved tensors smaller than this stay where they are: the copy would cost more than the memory is worth.
DEFAULT_MIN_BYTES = 1 << 20
# Without an explicit ``host_bytes``, the pool may hold this fraction of the host's available RAM
# (MemAvailable when the budget is first needed). Pinned memory cannot be swapped out, so a pool that
# grows into the rest of RAM gets the process OOM-killed; half leaves room for the data loader, the
# optimizer's CPU side and other processes on the machine.
DEFAULT_HOST_FRACTION = 0.5


def _streamed(device: torch.device) -> bool:
    """Whether copies for tensors on ``device`` go through side streams and events (CUDA only)."""
    return device.type == "cuda"


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` storage elements (some permutation of a contiguous layout),
    so its bytes can be copied as they are and the restored tensor keeps the same strides."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@dataclasses.dataclass
class OffloadStats:
    calls: int = 0  # checkpointed calls made through this offloader
    offloaded: int = 0  # saved tensors copied to host memory
    kept: int = 0  # saved tensors left in place (small, parameters, not on a CUDA device, no host memory)
    bytes_offloaded: int = 0
    # Saved tensors that were worth moving but stayed on the device: the host budget was reached, or
    # host memory could not be had. Also counted in ``kept``.
    kept_on_device: int = 0
    bytes_kept_on_device: int = 0
    prefetched: int = 0  # unpacks whose copy back had been started ahead of time
    fetched_on_demand: int = 0  # unpacks that had to start their copy back themselves


class _Offloaded:
    """What autograd holds instead of a saved tensor that went to host memory."""

    __slots__ = ("seq", "size", "stride", "dtype", "device", "dense", "buffer", "host", "source", "version",
                 "prefetch", "consumed", "__weakref__")

    def __init__(self, seq: int, t: torch.Tensor, buffer: _HostBuffer, host: torch.Tensor, dense: bool):
        self.seq = seq
        self.size, self.stride, self.dtype, self.device = t.shape, t.stride(), t.dtype, t.device
        self.dense = dense
        self.buffer = buffer
        self.host = host
        # The device tensor is not kept alive, but if it still is at unpack time, an in-place change made
        # after the checkpointed call is detected (autograd would have raised for a plainly saved tensor).
        self.source = weakref.ref(t)
        self.version = t._version
        # One slot, shared with the finalizer: None, _CLAIMED, or a started copy back
        # (device tensor, event, stream it was allocated on, side stream).
        self.prefetch: list = [None]
        self.consumed = False


# Marks an item whose prefetch copy is being issued by another thread.
_CLAIMED = (None, None, None, None)


def _forget(live: dict, lock: threading.RLock, pool: HostBufferPool, seq: int, buffer: _HostBuffer,
            prefetch: list) -> None:
    started = prefetch[0]
    if started is not None and started[3] is not None:
        # A copy back that nobody consumed: nothing on the compute stream waited for it, so the memory
        # must wait for the side stream before anyone reuses it.
        started[0].record_stream(started[3])
    prefetch[0] = None
    with lock:
        live.pop(seq, None)
    pool.release(buffer)


class ActivationOffloader:
    """Owns the side streams, host buffer pool and bookkeeping of offloaded checkpoint inputs.

    One offloader per model (patch_model creates one); :meth:`checkpoint` is the drop-in for
    ``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)``.

    Args:
        min_bytes: saved tensors smaller than this stay on the device.
        pin_memory: use pinned host memory (falls back to pageable memory with a warning).
        offload_cpu_tensors: also copy CPU tensors into the pool. Only useful to exercise the bookkeeping
            on a machine without a GPU; normally CPU tensors are left as they are.
        host_bytes: cap on the host memory the pool holds (pinned buffers counted as allocated, i.e.
            rounded up to a power of two). None: ``host_fraction`` of the host's available RAM, read when
            the budget is first needed (first offloaded tensor, or :meth:`host_budget`). Saved tensors
            that do not fit stay on the device, counted in ``stats.kept_on_device`` /
            ``stats.bytes_kept_on_device`` (a warning the first time).
        host_fraction: the fraction of available RAM used when ``host_bytes`` is None (default 0.5).
    """

    def __init__(self, min_bytes: int = DEFAULT_MIN_BYTES, pin_memory: bool = True, offload_cpu_tensors: bool = False,
                 host_bytes: int | None = None, host_fraction: float = DEFAULT_HOST_FRACTION):
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f"ActivationOffloader: min_bytes must be an int >= 0, got {min_bytes!r}")
        if host_bytes is not None and (isinstance(host_bytes, bool) or not isinstance(host_bytes, int) or host_bytes < 0):
            raise ValueError(f"ActivationOffloader: host_bytes must be None or an int >= 0 (bytes), got {host_bytes!r}")
        if isinstance(host_fraction, bool) or not isinstance(host_fraction, (int, float)) or not 0 < host_fraction <= 1:
            raise ValueError(f"ActivationOffloader: host_fraction must be a number in (0, 1], got {host_fraction!r}")
        self.min_bytes = min_bytes
        self.offload_cpu_tensors = offload_cpu_tensors
        self.host_bytes = host_bytes  # as asked; the resolved cap is pool.max_bytes
        self.host_fraction = float(host_fraction)
        self.pool = HostBufferPool(pin_memory)
        self._budget_resolved = False
        self._warned_budget = False
        self.stats = OffloadStats()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._live: dict[int, weakref.ref] = {}  # seq -> offloaded item, in pack order
        self._seq = 0
        self._lock = threading.RLock()  # see HostBufferPool._lock

    def __deepcopy__(self, memo):
        # A copied model gets its own pool and streams; buffers and events are never shared.
        return ActivationOffloader(self.min_bytes, self.pool.pin_memory, self.offload_cpu_tensors,
                                   self.host_bytes, self.host_fraction)

    def __repr__(self) -> str:
        budget = self.pool.max_bytes if self._budget_resolved else "unresolved"
        return (f"ActivationOffloader(min_bytes={self.min_bytes}, host_budget={budget}, "
                f"host_held={self.pool.bytes_held}, live={len(self._live)}, stats={self.stats})")

    def host_budget(self) -> int:
        """The cap on the pool's host memory, resolved (and fixed) on first call: ``host_bytes`` if given,
        else ``host_fraction`` x MemAvailable. If available RAM cannot be read (no /proc/meminfo, no
        psutil), the budget is 0 with a warning: every saved tensor stays on the device."""
        with self._lock:
            if not self._budget_resolved:
                budget = self.host_bytes
                if budget is None:
                    available = _available_host_bytes()
                    if available is None:
                        warnings.warn(
                            "fastkern offload_checkpoint: the host's available RAM cannot be read (no "
                            "/proc/meminfo, psutil not installed), so no host budget can be derived; saved "
                            "inputs stay on the device. Pass host_bytes to offload.",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                        budget = 0
                    else:
                        budget = int(available * self.host_fraction)
                self.pool.max_bytes = budget
                self._budget_resolved = True
            return self.pool.max_bytes

    def checkpoint(self, function: Callable, *args, **kwargs):
        """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)`` with the
        tensor arguments kept in host memory until the recompute needs them."""
        if kwargs.pop("use_reentrant", False):
            raise ValueError(
                "offload_checkpoint: use_reentrant=True is not supported; offloading relies on non-reentrant "
                "checkpointing (pass use_reentrant=False or leave it out)"
            )
        return self._offloaded(functools.partial(_torch_checkpoint, function, *args, use_reentrant=False, **kwargs))

    def recompute(self, function: Callable, *args, **kwargs):
        """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True, **kwargs)`` with the
        tensor arguments kept in host memory until backward reruns ``function``.

        The reentrant checkpoint runs ``function`` without autograd and saves its tensor arguments with
        ``ctx.save_for_backward`` when the call returns: the hooks below see exactly those, as they see the
        non-reentrant checkpoint's. Backward unpacks them (the copy back, usually prefetched) before the
        rerun, which runs outside these hooks, so what the rerun saves stays on the device as it would.
        The caller owns the reentrant form's conditions (an input that requires grad, ``.backward()``
        rather than ``torch.autograd.grad``): fastkern/patching/checkpointing.py checks them per call.

        The reentrant checkpoint saves its arguments only after ``function`` has been queued, so a copy
        started from the pack hook would wait for the whole layer and the next layer would wait for the
        copy. The copies of the tensor arguments therefore start before ``function`` runs (they overlap
        its kernels, as the non-reentrant checkpoint's do), and the pack hook hands autograd those copies
        when it saves the same tensors."""
        return self._offloaded(functools.partial(_torch_checkpoint, function, *args, use_reentrant=True, **kwargs),
                               early=args)

    def _offloaded(self, run: Callable, early: tuple = ()):
        """``run()`` with the tensors autograd saves during it offloaded (the hooks below); the copies of
        the tensors in ``early`` start before ``run``."""
        self.stats.calls += 1
        copied_out: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        started: dict[int, tuple[torch.Tensor, object]] = {}
        try:
            for t in early:
                if isinstance(t, torch.Tensor) and self.would_offload(t) and id(t) not in started:
                    started[id(t)] = (t, self._pack(copied_out, t))  # an item, or t kept on the device
            pack = (functools.partial(self._pack_started, started, copied_out) if started
                    else functools.partial(self._pack, copied_out))
            with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
                return run()
        finally:
            # After this call's forward kernels: the current stream waits for each copy out, then the
            # device tensor is dropped and its memory is reusable in stream order.
            for t, event in copied_out:
                torch.cuda.current_stream(t.device).wait_event(event)
            copied_out.clear()
            started.clear()  # an early copy autograd did not save is dropped with its item (buffer released)

    def _pack_started(self, started: dict, copied_out: list, t: torch.Tensor):
        entry = started.pop(id(t), None)
        if entry is not None and entry[0] is t:
            return entry[1]
        return self._pack(copied_out, t)

    def empty_cache(self) -> None:
        """Release the host buffers not in use now."""
        self.pool.empty_cache()

    @property
    def live_tensors(self) -> int:
        """Offloaded tensors autograd still holds (waiting for their backward)."""
        return len(self._live)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
            return stream

    def would_offload(self, t: torch.Tensor) -> bool:
        """Whether a saved ``t`` would go to host memory (device, kind and ``min_bytes``; the host budget
        is not consulted: a full pool keeps it on the device at pack time)."""
        if type(t) is not torch.Tensor or t.layout != torch.strided or t.numel() == 0:
            return False  # parameters, subclasses (DTensor, fake tensors), sparse: not ours to move
        if not _streamed(t.device) and not (t.device.type == "cpu" and self.offload_cpu_tensors):
            return False
        return t.numel() * t.element_size() >= self.min_bytes

    def _pack(self, copied_out: list, t: torch.Tensor):
        if not self.would_offload(t):
            self.stats.kept += 1
            return t
        nbytes = t.numel() * t.element_size()
        self.host_budget()
        buffer, reason = self.pool.acquire_or_reason(nbytes, pinned=_streamed(t.device))
        if buffer is None:  # over budget or no host memory: keeping it on the device beats failing
            self.stats.kept += 1
            self.stats.kept_on_device += 1
            self.stats.bytes_kept_on_device += nbytes
            if not self._warned_budget:
                self._warned_budget = True
                why = (f"the host budget of {self.pool.max_bytes / 2**30:.2f} GiB is reached (pool holds "
                       f"{self.pool.bytes_held / 2**30:.2f} GiB)" if reason == "budget" else
                       "host memory could not be allocated")
                warnings.warn(
                    f"fastkern offload_checkpoint: {why}; saved inputs that do not fit stay on the device "
                    "(counted in stats.kept_on_device / bytes_kept_on_device; warned once per offloader)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return t
        dense = _is_dense(t)
        flat = buffer.data[:nbytes].view(t.dtype)
        host = flat.as_strided(t.shape, t.stride()) if dense else flat.view(t.shape)
        if _streamed(t.device):
            compute = torch.cuda.current_stream(t.device)
            side = self._side_stream(t.device)
            side.wait_stream(compute)  # t is produced by work queued on the compute stream
            if buffer.last_copy is not None:
                side.wait_event(buffer.last_copy)  # a reused buffer may still be read by a copy back
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
                buffer.last_copy = side.record_event()
            copied_out.append((t, buffer.last_copy))  # released by checkpoint() once its forward is queued
        else:
            host.copy_(t)
        with self._lock:
            seq = self._seq
            self._seq += 1
        item = _Offloaded(seq, t, buffer, host, dense)
        with self._lock:
            self._live[seq] = weakref.ref(item)
        weakref.finalize(item, _forget, self._live, self._lock, self.pool, seq, buffer, item.prefetch)
        self.stats.offloaded += 1
        self.stats.bytes_offloaded += nbytes
        return item

    def _unpack(self, item):
        if not isinstance(item, _Offloaded):
            return item
        source = item.source()
        if source is not None and source._version != item.version:
            raise RuntimeError(
                "offload_checkpoint: a tensor argument of a checkpointed call was modified in place after the "
                f"call (version {item.version} -> {source._version}); the recompute would see other values"
            )
        with self._lock:
            ready, item.prefetch[0], item.consumed = item.prefetch[0], None, True
        if ready is None or ready is _CLAIMED:
            self.stats.fetched_on_demand += 1
            ready = self._copy_to_device(item)
        else:
            self.stats.prefetched += 1
        tensor, event, allocated_on, _ = ready
        if event is not None:
            current = torch.cuda.current_stream(item.device)
            current.wait_event(event)
            if current != allocated_on:  # freed later into allocated_on's pool while `current` may use it
                tensor.record_stream(current)
        self._prefetch_before(item)
        return tensor

    def _copy_to_device(self, item: _Offloaded) -> tuple:
        if item.dense:
            out = torch.empty_strided(item.size, item.stride, dtype=item.dtype, device=item.device)
        else:
            out = torch.empty(item.size, dtype=item.dtype, device=item.device)
        if not _streamed(item.device):
            out.copy_(item.host)
            return out, None, None, None
        compute = torch.cuda.current_stream(item.device)
        side = self._side_stream(item.device)
        side.wait_stream(compute)  # `out` was allocated on the compute stream; earlier work there may own it
        with torch.cuda.stream(side):
            side.wait_event(item.buffer.last_copy)  # the copy out (same stream today; explicit all the same)
            out.copy_(item.host, non_blocking=True)
            event = side.record_event()
        item.buffer.last_copy = event
        # The consumer's stream waits on `event` before using `out` (see _unpack), so its memory is reused
        # in stream order after the copy; a prefetch dropped unused is covered in _forget.
        return out, event, compute, side

    def _prefetch_before(self, item: _Offloaded) -> None:
        """Start copying back the latest item packed before ``item``: in backward, the next one needed."""
        with self._lock:
            order = list(self._live.items())
        target = None
        for seq, ref in reversed(order):
            candidate = ref() if seq < item.seq else None
            if candidate is not None and not candidate.consumed and candidate.device == item.device:
                target = candidate
                break
        if target is None:
            return
        with self._lock:
            if target.prefetch[0] is not None or target.consumed:
                return
            target.prefetch[0] = _CLAIMED  # another thread will not start a second copy
        copied = self._copy_to_device(target)
        with self._lock:
            if not target.consumed:
                target.prefetch[0] = copied
            elif copied[3] is not None:
                copied[0].record_stream(copied[3])  # consumed on demand meanwhile: this copy is unused

