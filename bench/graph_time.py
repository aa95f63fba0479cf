"""GPU time of a step with the host taken out: the step captured many times into one CUDA graph and
replayed (triton.testing.do_bench_cudagraph, median).

Why: on the lent GPU hosts a forward+backward of a few hundred microseconds of GPU work is often
bound by the host issuing it (Python, autograd, launches), and how fast the host is varies between
calls (docs/benchmarks.md). do_bench's wall-clock time then measures the host; the graph time measures
the kernels. The benches report both: the first is what a user sees in eager mode at that size, the
second what the kernels cost (and what a CUDA-graphed or larger-batch run sees).
"""

from __future__ import annotations

import math

_FAILED: set[str] = set()


def graph_ms(fn, name: str = "", rep: int = 50) -> float:
    """Median ms per call of ``fn`` replayed from a CUDA graph; NaN (reason printed once per name) when
    ``fn`` cannot be captured (a host sync, a CPU tensor, an allocation pattern the graph pool refuses)."""
    import torch
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except Exception as exc:  # a peer that cannot be captured is reported, not fatal
        if name not in _FAILED:
            _FAILED.add(name)
            print(f"graph timing of {name or fn}: not capturable ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
        torch.cuda.synchronize()
        return math.nan
