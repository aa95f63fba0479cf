"""bench/e2e.py's report: ratios against TRL and TRL + Liger, loss deviation from the reference run,
failed variants shown with their error (the GPU run itself is not possible on CPU)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _row(variant, step_ms, losses, error=None):
    tokens = 8192 / (step_ms / 1e3) if step_ms == step_ms else 0.0
    return dict(mode="lora", variant=variant, step_ms=step_ms, tokens_per_s=tokens, peak_gib=4.0, losses=losses,
                step_times_s=[], report="", error=error)


def test_table_ratios_deviation_and_errors():
    bench = _bench()
    rows = [_row("trl", 200.0, [2.0, 1.0]), _row("trl+liger", 160.0, [2.0, 1.0]),
            _row("fastkern", 100.0, [2.0, 1.1]), _row("reference", 1000.0, [2.0, 1.0]),
            _row("fastkern-compile", float("nan"), [], error="worker exit 1: boom")]
    text = bench.tables(rows)
    line = next(l for l in text.splitlines() if l.startswith("| fastkern |"))
    assert "2.00x" in line and "1.60x" in line
    assert f"{0.1 / 5 ** 0.5:.2e}" in line  # ||(0, 0.1)|| / ||(2, 1)||
    assert "worker exit 1: boom" in text
    assert bench._deviation([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert bench._deviation([], [1.0]) != bench._deviation([], [1.0])  # NaN: nothing to compare


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown variants"):
        _bench().main(["--out", str(tmp_path), "--modes", "lora", "--variants", "trl,nope"])
