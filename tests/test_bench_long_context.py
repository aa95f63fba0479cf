"""bench/long_context.py --size tiny runs on CPU: one LoRA training step per length with the long-context
settings (offloaded checkpoints, tiled MLP forced on), a finite loss, the JSON and the table written."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("peft")


@pytest.mark.slow
def test_tiny_sweep_writes_json_and_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("long_context", ROOT / "bench" / "long_context.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--size", "tiny", "--lengths", "48", "--tiled-mlp", "on", "--warmup-len", "16",
                       "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "long_context.json").read_text())
    assert result["variant"] == "long" and result["layers"] == 2 and result["trainable_params"] > 0
    assert "checkpointing" in result["report"] and "tiled_mlp" in result["report"]
    (row,) = result["results"]
    assert row["seq_len"] == 48 and row["ok"] and row["step_s"] > 0 and row["host_peak_rss_gib"] > 0
    assert "| 48 | True |" in capsys.readouterr().out


def test_oom_is_recognised():
    spec = importlib.util.spec_from_file_location("long_context", ROOT / "bench" / "long_context.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench._is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not bench._is_oom(ValueError("out of memory"))
    assert bench.parse_args(["--size", "1b"]).lengths is None
    assert bench.DEFAULT_LENGTHS["8b"] == [65536, 131072, 262144, 524288]
