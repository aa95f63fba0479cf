"""bench/bench_moe.py --tiny runs on the CPU (interpreter) and reports every implementation of both shapes."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_moe_tiny_runs():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_moe.py"), "--tiny"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    timed = [r for r in rows if "fwd_bwd_ms" in r]
    for shape in ("qwen3_30b_a3b", "mixtral_8x7b"):
        impls = {r["impl"] for r in timed if r["shape"] == shape}
        assert {"fastkern", "transformers_eager"} <= impls, rows
    assert all(r["fwd_bwd_ms"] > 0 for r in timed)
