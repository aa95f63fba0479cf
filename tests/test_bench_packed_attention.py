"""bench/bench_packed_attention.py --smoke runs on CPU: all rows agree, the table and the JSON are written."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_table_and_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_packed_attention", ROOT / "bench" / "bench_packed_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "packed_attention.json").read_text())
    assert [r["impl"] for r in result["rows"]] == ["transformers sdpa", "fastkern packing", "fastkern packing + rope"]
    assert all(r["fwd_bwd_ms"] > 0 for r in result["rows"])
    # Every row was checked against running each document alone; fastkern's must agree to fp32 accuracy.
    assert all(r["grad_rel_err"] < 1e-4 for r in result["rows"])
    # The backend column is recorded from the real calls (CPU has no varlen: per-document SDPA).
    assert [r["note"] for r in result["rows"][1:]] == ["backend: sdpa", "backend: sdpa"]
    assert "| fastkern packing |" in capsys.readouterr().out
    lengths = bench.document_lengths(32768, 64)
    assert len(lengths) == 64 and sum(lengths) == 32768 and min(lengths) >= 1
