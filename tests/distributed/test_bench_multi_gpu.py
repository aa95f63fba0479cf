"""bench/e2e/multi_gpu.py --tiny under torchrun with 2 CPU processes (gloo): TRL SFT LoRA through DDP with the
patched model, finite losses, one schema row written by rank 0 with one peak per rank."""

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench import schema

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("trl")
pytest.importorskip("peft")


@pytest.mark.slow
def test_tiny_ddp_run_writes_a_schema_row(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "bench.e2e.multi_gpu", "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("multi_gpu-*.json")
    (row,) = schema.read(path)
    extra = row["extra"]
    assert (extra["parallel"], extra["world"], row["case"], row["impl"]) == ("ddp", 2, "lora train step", "fastkern")
    assert len(extra["peak_gib_per_rank"]) == 2 and all(p > 0 for p in extra["peak_gib_per_rank"])
    assert row["peak_scope"] == "host" and row["peak_mib"] == max(extra["peak_gib_per_rank"]) * 1024
    assert extra["losses"] and all(math.isfinite(x) for x in extra["losses"]) and row["loss"] == extra["losses"][-1]
    assert row["throughput_unit"] == "tokens/s" and row["throughput"] > 0
    assert "loss" in extra["report"] and "fused_linear_logprobs" in extra["report"]
