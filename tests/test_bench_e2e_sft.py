"""bench/e2e/sft.py: the report (ratios against TRL and TRL + Liger, loss deviation from the reference run,
failed variants shown with their error) and a --tiny run on the CPU that writes rows of the one schema."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import schema
from bench.e2e import sft

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(device="NVIDIA H100", torch="2.13", triton="3.9", transformers="5.25", commit="abc")


def _row(variant, step_ms, losses, error=None):
    ok = error is None
    return schema.make_row(ENV, op="sft", case="lora train step", shape="1b B2 T4096", dtype="bfloat16", impl=variant,
                           ms=step_ms if ok else None, throughput=8192 / (step_ms / 1e3) if ok else None,
                           throughput_unit="tokens/s", peak_mib=4096.0 if ok else None, peak_scope="total",
                           loss=losses[-1] if losses else None, error=error, losses=losses)


def test_table_ratios_deviation_and_errors():
    rows = [_row("trl", 200.0, [2.0, 1.0]), _row("trl+liger", 160.0, [2.0, 1.0]),
            _row("fastkern", 100.0, [2.0, 1.1]), _row("reference", 1000.0, [2.0, 1.0]),
            _row("fastkern-compile", 1.0, [], error="worker exit 1: boom")]
    sft.add_deviations(rows)
    text = sft.tables(rows)
    line = next(l for l in text.splitlines() if l.startswith("| fastkern |"))
    assert "2.00x" in line and "1.60x" in line and "4.00 GiB (total)" in line
    assert f"{0.1 / 5 ** 0.5:.2e}" in line  # ||(0, 0.1)|| / ||(2, 1)||
    assert "worker exit 1: boom" in text
    assert rows[0]["extra"]["loss_deviation"] == 0.0 and "loss_deviation" not in rows[4]["extra"]
    assert sft._deviation([], [1.0]) != sft._deviation([], [1.0])  # NaN: nothing to compare
    for r in rows:
        schema.check_row(r)


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown variants"):
        sft.main(["--out", str(tmp_path), "--modes", "lora", "--variants", "trl,nope"])


@pytest.mark.slow
def test_tiny_run_writes_schema_rows(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.e2e.sft", "--tiny", "--modes", "lora", "--variants",
                           "trl,fastkern", "--shared-process", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = schema.read(tmp_path / "sft.json")
    assert [r["impl"] for r in rows] == ["trl", "fastkern"]
    for r in rows:
        assert r["error"] is None and r["ms"] > 0 and r["throughput_unit"] == "tokens/s" and r["throughput"] > 0
        assert r["peak_scope"] == "host" and math.isfinite(r["loss"]) and len(r["extra"]["losses"]) == 3
    assert "swiglu" in rows[1]["extra"]["report"] and rows[0]["extra"]["report"] == ""
    assert "| fastkern |" in (tmp_path / "sft.md").read_text()
    assert json.loads((tmp_path / "sft.json").read_text())["schema"] == schema.SCHEMA


@pytest.mark.slow
def test_tiny_qwen3_run_separates_the_qk_norms_only_in_its_variant(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.e2e.sft", "--tiny", "--family", "qwen3", "--modes", "full",
                           "--variants", "fastkern,fastkern-separate-qk-norm", "--shared-process", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fused, separate = schema.read(tmp_path / "sft.json")
    assert fused["shape"].startswith("qwen3 ") and fused["error"] is None and separate["error"] is None
    # Full fine-tuning: the q/k norm weights are trainable, so only the default variant fuses them into rope.
    assert "with the per-head q/k norms in the same launch" in fused["extra"]["report"]
    assert "join the launch while their weights are frozen" in separate["extra"]["report"]
    assert math.isfinite(fused["loss"]) and math.isfinite(separate["loss"])
