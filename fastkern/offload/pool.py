"""Pinned host buffers for offloaded checkpoint inputs, reused across layers and steps, under a host-RAM budget.

The pool is what :class:`~fastkern.offload.ActivationOffloader` copies saved tensors into; it owns the
host-memory side of offloading: how big a buffer is (rounded so nearby sizes share buffers, pinned ones
at the power of two PyTorch's pinned allocator really reserves), how much the pool may hold
(``max_bytes``), and whether the host can still give a new buffer (HOST_RESERVE_BYTES left available).
"""

from __future__ import annotations

import threading
import warnings

import torch

# A new host buffer is also refused when it would leave less than this much RAM available right now:
# the budget is read once, and other processes (or this one) may have taken memory since.
HOST_RESERVE_BYTES = 1 << 30


def _available_host_bytes() -> int | None:
    """RAM the host can still give without swapping (Linux MemAvailable, else psutil), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _pinned_capacity(nbytes: int) -> int:
    """What PyTorch's pinned host allocator really reserves for ``nbytes``: it rounds every request up to
    a power of two (ATen/core/CachingHostAllocator.h, ``PowerOf2Ceil``), so the pool asks for that size
    outright: the rounding costs the same either way, and the whole block can then be reused."""
    return 1 << max(nbytes - 1, 1).bit_length()


def _release_cached_pinned() -> None:
    """Give PyTorch's cached (freed) pinned blocks back to the OS so dropped pool buffers stop counting.
    Blocks that a pending copy still reads stay cached (the allocator waits for their events)."""
    for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):  # torch >= 2.13, older
        fn = getattr(torch._C, name, None)
        if fn is not None:
            fn()
            return


def _round_capacity(nbytes: int) -> int:
    """Round up to an eighth of the next power of two (<= 12.5 % slack) so nearby sizes share buffers."""
    granule = max(1 << 16, (1 << max(nbytes - 1, 1).bit_length()) >> 3)
    return -(-nbytes // granule) * granule


class _HostBuffer:
    __slots__ = ("data", "last_copy", "pinned")

    def __init__(self, data: torch.Tensor, pinned: bool = False):
        self.data = data  # 1-D uint8, pinned when possible
        self.pinned = pinned  # from PyTorch's pinned allocator (known at allocation; no is_pinned() query)
        self.last_copy: torch.cuda.Event | None = None  # the latest copy issued into or out of it

    @property
    def capacity(self) -> int:
        return self.data.numel()


class HostBufferPool:
    """Host buffers reused across layers and steps; thread-safe (autograd runs backward in its own thread).

    A request takes the smallest free buffer that fits. When none fits, the free ones are all too small
    for the workload as it is now, so they are released before a new buffer is allocated: the pool holds
    at most (tensors alive at once) buffers of the largest size seen, whatever the sequence lengths do.

    ``max_bytes`` caps ``bytes_held`` (None: no cap). Pinned buffers are sized as the pinned allocator
    really reserves them (a power of two), so ``bytes_held`` is the host memory the pool costs.
    """

    def __init__(self, pin_memory: bool = True, max_bytes: int | None = None):
        self.pin_memory = pin_memory
        self.max_bytes = max_bytes
        self._pin_failed = False
        self._free: list[_HostBuffer] = []
        # Reentrant: a saved tensor freed while the lock is held runs its finalizer (release) right there.
        self._lock = threading.RLock()
        self.bytes_held = 0  # free and in use
        self.peak_bytes_held = 0
        self.buffers_held = 0
        self.allocations = 0

    def acquire(self, nbytes: int, pinned: bool) -> _HostBuffer | None:
        """A buffer of at least ``nbytes``, or None if the budget or host memory does not allow one."""
        return self.acquire_or_reason(nbytes, pinned)[0]

    def acquire_or_reason(self, nbytes: int, pinned: bool) -> tuple[_HostBuffer | None, str | None]:
        """(buffer, None), or (None, "budget") when the pool would pass ``max_bytes`` or leave less than
        HOST_RESERVE_BYTES of RAM available, or (None, "memory") when the allocation failed."""
        with self._lock:
            fits = [b for b in self._free if b.capacity >= nbytes]
            if fits:
                best = min(fits, key=lambda b: b.capacity)
                self._free.remove(best)
                return best, None
            self._drop(self._free)
            self._free = []
            pinned = pinned and self.pin_memory and not self._pin_failed
            capacity = _pinned_capacity(nbytes) if pinned else _round_capacity(nbytes)
            if not self._allowed(capacity):
                if capacity > nbytes and not pinned and self._allowed(nbytes):
                    capacity = nbytes  # pageable memory is not rounded: the exact size may still fit
                else:
                    return None, "budget"
            data = self._allocate(capacity, pinned)
            if data is None:
                return None, "memory"
            pinned = pinned and not self._pin_failed  # False if this very allocation fell back
            self.bytes_held += data.numel()
            self.peak_bytes_held = max(self.peak_bytes_held, self.bytes_held)
            self.buffers_held += 1
            self.allocations += 1
            return _HostBuffer(data, pinned), None

    def _allowed(self, capacity: int) -> bool:
        if self.max_bytes is not None and self.bytes_held + capacity > self.max_bytes:
            return False
        available = _available_host_bytes()  # only read for a new buffer: a few times per run
        return available is None or capacity + HOST_RESERVE_BYTES <= available

    def release(self, buffer: _HostBuffer) -> None:
        with self._lock:
            self._free.append(buffer)

    def empty_cache(self) -> None:
        """Release the free buffers (PyTorch's host allocator delays their reuse until pending copies end)."""
        with self._lock:
            self._drop(self._free)
            self._free = []

    def _drop(self, buffers: list[_HostBuffer]) -> None:
        pinned = False
        for b in buffers:
            self.bytes_held -= b.capacity
            self.buffers_held -= 1
            pinned = pinned or b.pinned
        if pinned:
            # Freed pinned memory stays in PyTorch's host cache; released, it no longer counts anywhere.
            buffers.clear()
            _release_cached_pinned()

    def _allocate(self, capacity: int, pinned: bool) -> torch.Tensor | None:
        if pinned and self.pin_memory and not self._pin_failed:
            try:
                return torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as exc:
                self._pin_failed = True
                warnings.warn(
                    f"fastkern offload_checkpoint: pinned host memory is unavailable ({exc}); falling back to "
                    "pageable memory, where every copy blocks the CPU thread until the GPU has caught up",
                    RuntimeWarning,
                    stacklevel=4,
                )
        try:
            return torch.empty(capacity, dtype=torch.uint8)
        except (RuntimeError, MemoryError):
            return None

