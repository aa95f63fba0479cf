"""bench/multi_gpu.py --tiny under torchrun with 2 CPU processes (gloo): TRL SFT LoRA through DDP with the
patched model, finite losses, the JSON written by rank 0 with one peak per rank."""

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("trl")
pytest.importorskip("peft")


@pytest.mark.slow
def test_tiny_ddp_run_writes_json(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(ROOT / "bench" / "multi_gpu.py"), "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("multi_gpu-*.json")
    result = json.loads(path.read_text())
    assert (result["parallel"], result["world"], result["mode"], result["variant"]) == ("ddp", 2, "lora", "fastkern")
    assert len(result["peak_gib_per_rank"]) == 2 and all(p > 0 for p in result["peak_gib_per_rank"])
    assert result["losses"] and all(math.isfinite(x) for x in result["losses"]) and result["tokens_per_s"] > 0
    assert "loss" in result["report"] and "fused_linear_logprobs" in result["report"]
