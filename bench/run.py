"""The bench runner: runs the per-op cases (bench/cases/<op>.py) and writes their rows in one schema.

    python bench/run.py --ops glu,rope --out DIR [--device cuda] [--base REV] [--threshold 0.10]
    python bench/run.py --ops all --tiny --device cpu --out DIR     # tiny shapes: checks every case runs

Writes DIR/results.json (bench/schema.py) and prints the tables bench/plot.py makes from it. Each case
checks every implementation against a float32 (or exact) computation at the bench shape before timing
it; a wrong or failing implementation becomes a row with ``error`` instead of a time. With ``--base REV``
the same cases then run against fastkern as of git revision REV (unpacked with ``git archive``, the
bench code stays this tree's) into DIR/base.json, and bench/compare.py compares the two (exit 1 on a
median slower by more than the threshold).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
import traceback

import compare
import plot
import schema
from measure import Bench

OPS = ("glu", "rope", "rope_qk_norm", "rms_norm", "linear_cross_entropy", "linear_cross_entropy_onchip", "lora_linear", "nf4",
       "packed_attention", "moe_experts")
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="all", help=f"comma-separated, or all: {','.join(OPS)}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few repetitions (CPU checks)")
    parser.add_argument("--base", metavar="REV", help="also run against fastkern at this git revision, compare")
    parser.add_argument("--threshold", type=float, default=0.10, help="--base: slower by more than this fails")
    parser.add_argument("--commit", help=argparse.SUPPRESS)  # the revision a --base child runs (no .git there)
    args = parser.parse_args(argv)
    args.ops = list(OPS) if args.ops == "all" else [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; known: {', '.join(OPS)}")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def run_ops(ops: list[str], device: str, tiny: bool, commit: str | None = None) -> tuple[list[dict], list[str]]:
    """All rows of the given ops, and the ops whose case module raised (a bug, not a peer's failure)."""
    bench = Bench(device, tiny, commit)
    crashed = []
    for op in ops:
        started = time.time()
        print(f"=== {op}", flush=True)
        try:
            importlib.import_module(f"cases.{op}").run(bench)
        except Exception:
            traceback.print_exc()
            crashed.append(op)
        bench.empty_cache()
        print(f"=== {op}: {time.time() - started:.0f} s", flush=True)
    return bench.rows, crashed


def run_base(args, rev: str) -> int:
    """Run this runner in a child process importing fastkern as of ``rev``; rows go to OUT/base.json."""
    sha = subprocess.run(["git", "-C", HERE, "rev-parse", rev], capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "-C", os.path.dirname(HERE), "archive", sha, "fastkern"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        child = [sys.executable, os.path.join(HERE, "run.py"), "--ops", ",".join(args.ops), "--device", args.device,
                 "--out", os.path.join(args.out, "base"), "--commit", sha] + (["--tiny"] if args.tiny else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        done = subprocess.run(child, env=env)
    os.replace(os.path.join(args.out, "base", "results.json"), os.path.join(args.out, "base.json"))
    return done.returncode


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, crashed = run_ops(args.ops, args.device, args.tiny, args.commit)
    path = os.path.join(args.out, "results.json")
    schema.write(path, rows)
    print("\n" + plot.tables(rows))
    print(f"wrote {path} ({len(rows)} rows)")
    if crashed:
        print(f"cases that raised: {', '.join(crashed)}")
        return 1
    if args.base:
        if run_base(args, args.base) != 0:
            return 1
        return compare.main([os.path.join(args.out, "base.json"), path, "--threshold", str(args.threshold)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
