"""The `fastkern` console script: `fastkern env` and `fastkern demo`."""

from __future__ import annotations

import sys


def env_main() -> int:
    import torch

    from . import runtime
    from .patching.specs import load_specs

    info = runtime.describe()
    width = max(map(len, info))
    print("fastkern", __import__("fastkern").__version__)
    for key, value in info.items():
        print(f"  {key:<{width}}  {value}")
    print("  ops (path for cpu / cuda tensors):")
    cpu = runtime.path_for(torch.empty(0))
    cuda = runtime.path_for(torch.empty(0, device="cuda")) if torch.cuda.is_available() else "no cuda device"
    import inspect

    ops = __import__("fastkern.ops", fromlist=["__all__"])
    for op in sorted(n for n in ops.__all__ if inspect.isfunction(getattr(ops, n))):
        print(f"    {op:<28} {cpu} / {cuda}")
    if not runtime.triton_available():
        print("  triton is not installed: every op runs its PyTorch reference")
    print("  patch specs:", ", ".join(f"{s.family} ({', '.join(s.sections)})" for s in load_specs()))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastkern {env,demo} [options]\n  env   versions, device, Triton, which path each op takes\n"
              "  demo  TRL SFT fine-tune of a small model, unpatched vs patched (fastkern demo --help)")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "env":
        return env_main()
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    print(f"fastkern: unknown command {command!r} (expected env or demo)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
