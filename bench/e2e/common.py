"""What the end-to-end benches share: the device, its peak-memory reading and the results file."""

from __future__ import annotations

import os
import resource

import torch

from bench import schema
from fastkern.demo import quiet_bitsandbytes_cpu_notice

quiet_bitsandbytes_cpu_notice()  # peft imports bitsandbytes, whose CPU hub-kernel notice is noise here
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device(tiny: bool = False) -> torch.device:
    """cuda when there is one and the run is not ``--tiny``, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak(dev: torch.device) -> dict:
    """``peak_mib`` and ``peak_scope`` of a run: torch's peak allocated on CUDA (since the last
    reset_peak), the process's max resident set on the CPU (a high-water mark that never drops)."""
    if dev.type == "cuda":
        return dict(peak_mib=torch.cuda.max_memory_allocated(dev) / 2**20, peak_scope="total")
    return dict(peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak_scope="host")


def environment(dev: torch.device) -> dict:
    return schema.environment(str(dev))


def write(out: str, name: str, rows: list[dict]) -> str:
    """``out/name.json`` in the one results schema; returns the path."""
    path = os.path.join(out, f"{name}.json")
    schema.write(path, rows)
    return path


def error_text(exc: BaseException, limit: int = 400) -> str:
    return f"{type(exc).__name__}: {exc}"[:limit]
