"""How the cases time and measure: one ``Bench`` per run, passed to every case's ``run(bench)``.

* ``ms``: median of ``triton.testing.do_bench`` on CUDA (CUDA events, host time included: "wall");
  on the CPU a median of a few wall-clock calls (the ``--tiny`` path, which checks that a case runs:
  CPU times through Triton's interpreter mean nothing).
* ``graph_ms``: GPU time with the host taken out: the call captured many times into one CUDA graph and
  replayed (``triton.testing.do_bench_cudagraph``, median). On the GPU hosts a fwd+bwd of a few hundred
  microseconds of GPU work is often bound by the host issuing it, and host speed varies between
  machines; the graph time is what the kernels cost. None on the CPU or when the call cannot be
  captured (a host sync, an allocation the graph pool refuses; the reason is printed once).
* ``wall_ms``: synchronized wall-clock median over rounds of several calls (the regression baseline's
  measure, bench/baselines/).
* ``host_ms``: mean wall time per call with no synchronization inside the loop, on tiny inputs: what
  the host needs to issue the work (Python, dispatch, launches).
* ``peak_mib``: peak allocated during one call minus what was allocated before it (None on the CPU).
"""

from __future__ import annotations

import statistics
import time

import schema


class Bench:
    def __init__(self, device: str, tiny: bool, commit: str | None = None):
        import torch

        self.device, self.tiny = device, tiny
        self.cuda = device.startswith("cuda")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.env = schema.environment(device, commit)
        self.rows: list[dict] = []
        self._not_capturable: set[str] = set()

    # -- recording -------------------------------------------------------------------------------
    def add(self, op: str, case: str, shape: str, impl: str, dtype=None, **fields) -> dict:
        dtype = str(dtype or self.dtype).removeprefix("torch.")
        row = schema.make_row(self.env, op=op, case=case, shape=shape, dtype=dtype, impl=impl, **fields)
        self.rows.append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if k in ("case", "shape", "impl", "ms", "peak_mib", "throughput", "error")}
        print(op, shown, flush=True)
        return row

    # -- timing ----------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def ms(self, fn, warmup: int = 25, rep: int = 100) -> float:
        if self.cuda:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        fn()
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def graph_ms(self, fn, name: str = "", rep: int = 50) -> float | None:
        if not self.cuda:
            return None
        import torch
        from triton.testing import do_bench_cudagraph

        try:
            return float(do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        except Exception as exc:  # a peer that cannot be captured is reported, not fatal
            if name not in self._not_capturable:
                self._not_capturable.add(name)
                print(f"graph timing of {name or fn}: not capturable ({type(exc).__name__}: {str(exc)[:160]})")
            torch.cuda.synchronize()
            return None

    def wall_ms(self, fn, rounds: int = 30, iterations: int = 5, warmup_rounds: int = 2) -> float:
        """Median over rounds of the synchronized wall time of ``iterations`` calls, per call."""
        if not self.cuda:
            rounds, iterations, warmup_rounds = 1, 1, 0
        times = []
        for i in range(warmup_rounds + rounds):
            self.sync()
            start = time.perf_counter()
            for _ in range(iterations):
                fn()
            self.sync()
            if i >= warmup_rounds:
                times.append((time.perf_counter() - start) * 1e3 / iterations)
        return statistics.median(times)

    def host_ms(self, fn, steps: int = 200, warmup: int = 20) -> float:
        if not self.cuda:
            steps, warmup = 2, 1
        for _ in range(warmup):
            fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        elapsed = time.perf_counter() - start
        self.sync()
        return elapsed * 1e3 / steps

    def peak_mib(self, fn) -> float | None:
        if not self.cuda:
            fn()
            return None
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20

    def empty_cache(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()


def saved_bytes(fn, inputs) -> int:
    """Bytes autograd saves for backward during ``fn(*inputs)`` beyond the inputs' own storages."""
    import torch

    seen, total = {t.untyped_storage().data_ptr() for t in inputs}, [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return total[0]


def rel_err(a, b) -> float:
    """Relative error norm ||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def describe(exc: BaseException, limit: int = 160) -> str:
    return f"{type(exc).__name__}: {str(exc)[:limit]}"
