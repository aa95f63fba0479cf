"""The `fastkern` console script: `fastkern env`, `fastkern demo` and `fastkern capacity`."""

from __future__ import annotations

import sys


def env_main(argv=()) -> int:
    import argparse

    argparse.ArgumentParser(
        prog="fastkern env",
        description="Print the versions of torch, Triton and the integrations, the device, which path "
                    "(triton, interpreter or reference) each op takes for CPU and CUDA tensors, and the "
                    "patch specs.").parse_args(argv)
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

    from . import ops

    composed = _composed_op_paths(torch)
    for op in sorted(n for n in ops.__all__ if inspect.isfunction(getattr(ops, n))):
        print(f"    {op:<28} {composed.get(op, f'{cpu} / {cuda}')}")
    if not runtime.triton_available():
        print("  triton is not installed: every op runs its PyTorch reference")
    print("  patch specs:", ", ".join(f"{s.family} ({', '.join(s.sections)})" for s in load_specs()))
    return 0


def _composed_op_paths(torch) -> dict[str, str]:
    """Ops built from torch's own kernels have no Triton path: say what runs instead."""
    from .ops.document_attention import select_backend

    def attention(device, dtype):
        q = torch.empty(1, 1, 64, device=device, dtype=dtype)
        return select_backend(q, q, bounds=[0, 1])

    cuda = (f"{attention('cuda', torch.bfloat16)} for fp16/bf16, else sdpa" if torch.cuda.is_available()
            else "no cuda device")
    return {"document_attention": f"torch {attention('cpu', torch.float32)} / {cuda}",
            "tiled_mlp": "the module's own forward, tile by tile (any device)"}


def capacity_main(argv) -> int:
    import argparse

    from .capacity import GIB, SIZES, plan_memory

    parser = argparse.ArgumentParser(
        prog="fastkern capacity",
        description="Predicted device and host peak of one training step and the longest sequence that fits "
                    "(fastkern.plan_memory; a prediction from docs/long_context.md, checked on a GPU for one configuration).")
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--size", choices=sorted(SIZES), help="a known model shape")
    shape.add_argument("--config", help="a transformers model directory or hub name (its config.json)")
    parser.add_argument("--seq-len", type=int, default=131072, help="tokens per sequence (default 131072)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank on every decoder Linear (default 16)")
    parser.add_argument("--full", action="store_true", help="full fine-tune instead of LoRA")
    parser.add_argument("--qlora", action="store_true", help="decoder weights in NF4 (double quantization)")
    parser.add_argument("--checkpointing", choices=("offload", "device", "none"), default="offload")
    parser.add_argument("--tiled-mlp", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--device-gib", type=float, help="device budget in GiB")
    parser.add_argument("--host-gib", type=float, help="host budget of the offloaded checkpoints in GiB")
    args = parser.parse_args(argv)
    if args.full and args.qlora:
        parser.error("--full and --qlora exclude each other")
    for name in ("device_gib", "host_gib"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    model = args.size
    if args.config:
        from transformers import AutoConfig

        model = AutoConfig.from_pretrained(args.config)
    options = {"checkpointing": None if args.checkpointing == "none" else args.checkpointing,
               "tiled_mlp": {"auto": "auto", "on": True, "off": False}[args.tiled_mlp]}
    as_bytes = lambda gib: None if gib is None else int(gib * GIB)  # noqa: E731
    try:
        plan = plan_memory(model, args.seq_len, batch=args.batch, lora_rank=None if args.full else args.lora_r,
                           qlora=args.qlora, options=options, device_bytes=as_bytes(args.device_gib),
                           host_bytes=as_bytes(args.host_gib))
    except ValueError as exc:
        parser.error(str(exc))
    print(plan)
    return 0


USAGE = """usage: fastkern [--version] {env,demo,capacity} [options]
  env       versions, device, Triton, which path each op takes
  demo      TRL fine-tune of a small model, unpatched vs patched (fastkern demo --help)
  capacity  predicted device/host peak and longest sequence (fastkern capacity --help)"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print("fastkern", __version__)
        return 0
    command, rest = argv[0], argv[1:]
    from .demo_common import quiet_bitsandbytes_cpu_notice

    quiet_bitsandbytes_cpu_notice()
    if command == "env":
        return env_main(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command == "capacity":
        return capacity_main(rest)
    print(f"fastkern: unknown command {command!r} (expected env, demo or capacity)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
