"""Host cost of one eager forward+backward call of each autograd op, measured on the CPU.

    python3 bench/host_op_call.py [--calls 2000] [--repeats 5] [--ops glu,rms_norm,...] [--clock wall|thread]
                                  [--json PATH]

On the GPU a fine-tuning step of a small model is host-bound: what an op costs there is the host
work of issuing it, which the CPU can measure. The Triton kernels are replaced by no-op launchers
(``kernel[grid](...)`` returns at once) and the ops are sent down their kernel branch
(``op_path`` says "triton"), so everything an op does on the host is counted (argument checks,
dispatch, autograd bookkeeping, output allocation, launch-argument preparation) and neither the
Triton interpreter nor the PyTorch reference is. ``lora_linear`` has no Triton kernel: its row is
its dense CPU path at a tiny shape (M=4, K=16, N=16, r=4), where the matmuls cost next to nothing.

Per op and call (one forward and one backward), the columns are:

* ``us``: host time in microseconds, the best of ``--repeats`` means over ``--calls`` calls; wall
  clock, or with ``--clock thread`` the CPU time of the calling thread (time the process spends
  descheduled on a busy machine is not counted, so two revisions compare with less noise there);
* ``py_calls``: Python function calls (cProfile's count over 200 calls, divided);
* ``aten_ops``: aten operator calls below autograd (a TorchDispatchMode over one call).

Times from a shared or busy CPU vary by a few percent between runs; compare two revisions by
running both in alternation (``PYTHONPATH=<checkout> python3 bench/host_op_call.py``).
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import importlib
import json
import pstats
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# kernel module under fastkern.kernels -> (module whose op_path picks the branch, its kernels)
_KERNELS = {"glu": ("fastkern.ops.glu", ("glu_forward_kernel", "glu_backward_kernel")),
            "rms_norm": ("fastkern.ops.rms_norm", ("rms_norm_forward_kernel", "rms_norm_backward_kernel")),
            "nf4_matmul": ("fastkern.experimental.nf4_matmul", ("nf4_matmul_kernel",)),
            "rope": ("fastkern.ops.rope", ("rope_qk_kernel",))}
_CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _op_module(name: str):
    """The module of ``name`` in the fastkern being measured; nf4_matmul: fastkern.ops.nf4_matmul in
    revisions that exported it (asked of fastkern.ops first: importing fastkern.experimental there
    could find the installed checkout's instead)."""
    if name == "fastkern.experimental.nf4_matmul":
        import fastkern.ops
        if hasattr(fastkern.ops, "nf4_matmul"):
            return importlib.import_module("fastkern.ops.nf4_matmul")
    return importlib.import_module(name)


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    @staticmethod
    def _run(*args, **kwargs):
        return None

    def __getitem__(self, grid):
        return self._run


@contextlib.contextmanager
def no_op_kernels():
    """Within the block, every op's kernel branch is taken and launches nothing; restored after."""
    saved = []
    for name, (op_module_name, kernels) in _KERNELS.items():
        kernel_module = importlib.import_module(f"fastkern.kernels.{name}")
        op_module = _op_module(op_module_name)
        saved += [(kernel_module, k, getattr(kernel_module, k)) for k in kernels]
        saved.append((op_module, "op_path", op_module.op_path))
        for kernel in kernels:
            setattr(kernel_module, kernel, _NoLaunch())
        op_module.op_path = lambda t: "triton"
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _cases() -> dict:
    """op name -> a closure running one forward + backward."""
    import fastkern.ops as ops
    nf4_matmul = _op_module(_KERNELS["nf4_matmul"][0]).nf4_matmul

    torch.manual_seed(0)
    cases = {}

    g0, u0 = torch.randn(8, 64, requires_grad=True), torch.randn(8, 64, requires_grad=True)
    dy = torch.randn(8, 64)

    def glu(overwrite):
        def step():
            ops.swiglu(g0 * 1, u0 * 1, overwrite_inputs_in_backward=overwrite).backward(dy)
        return step

    cases["glu"], cases["glu_overwrite"] = glu(False), glu(True)

    x, w = torch.randn(8, 64, requires_grad=True), torch.rand(64, requires_grad=True)
    cases["rms_norm"] = lambda: ops.rms_norm(x, w).backward(dy)

    xl = torch.randn(4, 16, requires_grad=True)
    wl = torch.randn(16, 16)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    dyl = torch.randn(4, 16)
    cases["lora_linear"] = lambda: ops.lora_linear(xl, wl, a, b, 0.5).backward(dyl)

    packed, state = ops.nf4_quantize(torch.randn(32, 64))
    xn = torch.randn(4, 64, requires_grad=True)
    dyn = torch.randn(4, 32)
    cases["nf4_matmul"] = lambda: nf4_matmul(xn, packed, state).backward(dyn)

    q, k = torch.randn(1, 4, 8, 16, requires_grad=True), torch.randn(1, 2, 8, 16, requires_grad=True)
    cos, sin = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    dq, dk = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)

    def rope_out_of_place():
        torch.autograd.backward(ops.rope(q, k, cos, sin, inplace=False), (dq, dk))

    def rope_in_place():
        qv, kv = q * 1, k * 1
        torch.autograd.backward(ops.rope(qv, kv, cos, sin), (dq, dk))

    cases["rope"], cases["rope_inplace"] = rope_out_of_place, rope_in_place
    return cases


def time_per_call(step, calls: int, repeats: int, clock=time.perf_counter) -> float:
    for _ in range(min(200, calls)):
        step()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            step()
        best = min(best, (clock() - t0) / calls)
    return best * 1e6


def python_calls_per_call(step, calls: int = 200) -> float:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        step()
    profile.disable()
    return pstats.Stats(profile).total_calls / calls


class _CountAten(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_ops_per_call(step) -> int:
    with _CountAten() as mode:
        step()
    return mode.count


def measure(names=None, calls: int = 2000, repeats: int = 5, clock: str = "wall") -> dict:
    """{op: {"us", "py_calls", "aten_ops"}} for the named cases (default all); ``clock``: wall or thread."""
    rows = {}
    with no_op_kernels():
        cases = _cases()
        for name in names or cases:
            step = cases[name]
            rows[name] = {"us": round(time_per_call(step, calls, repeats, _CLOCKS[clock]), 2),
                          "py_calls": round(python_calls_per_call(step, min(200, calls)), 1),
                          "aten_ops": aten_ops_per_call(step)}
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ops", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--clock", choices=sorted(_CLOCKS), default="wall",
                        help="wall clock, or the CPU time of the calling thread (less noise on a busy machine)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = measure(args.ops.split(",") if args.ops else None, args.calls, args.repeats, args.clock)
    import fastkern
    print(f"fastkern from {fastkern.__file__}, torch {torch.__version__}, {args.clock} clock")
    print(f"{'op':<15} {'us/call':>9} {'py calls':>9} {'aten ops':>9}")
    for name, row in rows.items():
        print(f"{name:<15} {row['us']:>9.2f} {row['py_calls']:>9.1f} {row['aten_ops']:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "fastkern": fastkern.__file__, "clock": args.clock, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
