"""bench/e2e/offload.py --tiny on the CPU: every checkpointing variant checked against plain checkpointing,
timed or reported with its error, as rows of the one schema (the long-context search is CUDA only)."""

import pytest

from bench import schema

pytest.importorskip("peft")
from bench.e2e import offload  # noqa: E402


@pytest.mark.slow
def test_tiny_rows(tmp_path):
    assert offload.main(["--tiny", "--out", str(tmp_path)]) == 0
    rows = {r["impl"]: r for r in schema.read(tmp_path / "offload.json")}
    assert list(rows) == offload.VARIANTS
    for name in ("no checkpointing", "plain checkpointing", "fastkern offload"):
        r = rows[name]
        assert r["error"] is None and r["ms"] > 0 and r["extra"]["rel_err"] < offload.TOLERANCE
        assert r["peak_scope"] == "host" and r["loss"] > 0 and "longest_T" not in r["extra"]
    assert "calls" in rows["fastkern offload"]["extra"]  # the offloader's counters
    assert all(r["error"] for r in rows.values() if r["ms"] is None)
