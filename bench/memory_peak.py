"""What is alive at a step's memory peak, from the CUDA caching allocator's own history.

    with record() as trace:   # torch.cuda.memory._record_memory_history for the block
        step()
    print(peak_report(trace.events, top=15))

``record`` keeps the allocator's events (alloc / free, size, Python frames) for the block; ``peak_report``
replays them, finds the moment the live bytes peak and groups the allocations alive then by the first
frame outside torch's own code (the line of fastkern, transformers, peft or trl that asked for it).
Bytes allocated before the block (the model, saved inputs of an earlier step) are not in the events
and not counted: the report is the peak *within* the block, like the benches' peak-extra numbers.
"""

from __future__ import annotations

import collections
import contextlib
import re

# Frames from these paths are the allocator's callers inside torch; the report skips past them.
_TORCH_PATHS = ("/torch/", "/triton/", "<frozen", "contextlib.py")


class _Trace:
    events: list


@contextlib.contextmanager
def record(max_entries: int = 500_000):
    import torch

    trace = _Trace()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        yield trace
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        trace.events = [e for device in snapshot["device_traces"] for e in device]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


# An autograd node's C++ frame (``torch::autograd::generated::MmBackward0::apply``): the best name for an
# allocation made by the autograd engine, where no Python frame exists.
_AUTOGRAD_NODE = re.compile(r"(\w+Backward\d*)")


def _site(frames) -> str:
    """The first Python frame outside torch; else the autograd node; else "(torch internals)".

    The recorded stacks mix C++ frames (file ``??``, innermost first) with Python frames; only the
    Python ones name a line of fastkern, transformers, peft or trl.
    """
    node = None
    for f in frames or ():
        name = f.get("filename", "")
        if not name.endswith(".py"):
            if node is None:
                match = _AUTOGRAD_NODE.search(f.get("name", ""))
                node = match.group(1) if match else None
            continue
        if not any(p in name for p in _TORCH_PATHS):
            short = name.split("site-packages/")[-1].split("/work/main/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return f"(autograd engine: {node})" if node else "(torch internals)"


def peak_report(events, top: int = 15) -> str:
    """Live bytes at the peak of the recorded block, grouped by allocation site (largest first)."""
    live, live_bytes, peak, peak_live, peak_frames = {}, 0, 0, {}, ()
    for e in events:
        action, addr, size = e.get("action"), e.get("addr"), e.get("size", 0)
        if action == "alloc":
            live[addr] = (size, e.get("frames"))
            live_bytes += size
            if live_bytes > peak:
                peak, peak_live, peak_frames = live_bytes, dict(live), e.get("frames") or ()
        elif action in ("free_completed",) and addr in live:
            live_bytes -= live.pop(addr)[0]
    groups = collections.Counter()
    counts = collections.Counter()
    for size, frames in peak_live.values():
        site = _site(frames)
        groups[site] += size
        counts[site] += 1
    lines = [f"peak within the block: {peak / 2**20:.1f} MiB in {len(peak_live)} allocations"]
    for site, nbytes in groups.most_common(top):
        lines.append(f"  {nbytes / 2**20:9.1f} MiB  x{counts[site]:<4d} {site}")
    # Where the step was when it peaked: the Python stack of the allocation that set the peak.
    where = [f"{f['filename'].split('site-packages/')[-1].split('/work/main/')[-1]}:{f.get('line')} {f.get('name')}"
             for f in peak_frames if f.get("filename", "").endswith(".py")]
    if where:
        lines.append("  peak reached in: " + " <- ".join(where[:8]))
    return "\n".join(lines)
