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
                           "--variants", "fastkern,fastkern-separate-qk-norm", "--shared-process",
                           "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fused, separate = schema.read(tmp_path / "sft.json")
    assert fused["shape"].startswith("qwen3 ") and fused["error"] is None and separate["error"] is None
    # Full fine-tuning: the q/k norm weights are trainable, so only the default variant fuses them into rope.
    assert "with the per-head q/k norms in the same launch" in fused["extra"]["report"]
    assert "join the launch while their weights are frozen" in separate["extra"]["report"]
    assert math.isfinite(fused["loss"]) and math.isfinite(separate["loss"])


def test_profile_memory_trace_marks_each_layer_forward_rerun_and_backward(tmp_path, monkeypatch):
    """The --profile memory trace (CUDA counters, faked here): one mark per decoder layer's forward and at
    the start of its backward, written to memory-<label>.json, hooks removed afterwards."""
    import torch
    from transformers import TrainerCallback

    from tests.models import tiny_model

    allocated = iter(range(10_000))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: next(allocated) * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 5 * 2**30)
    model = tiny_model("llama", dtype=torch.float32).train()
    model.gradient_checkpointing_enable()
    callback = sft._profiler_callback(TrainerCallback, str(tmp_path), "full-x", first=1, steps=1)
    state = type("State", (), {"global_step": 0})()
    callback.on_step_begin(None, state, None, model=model)
    ids = torch.randint(0, 100, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    state.global_step = 1
    callback.on_step_end(None, state, None, model=model)
    trace = [w for w, _, _ in json.loads((tmp_path / "memory-full-x.json").read_text())["trace"]]
    layers = model.config.num_hidden_layers
    assert trace[0] == "step begin" and trace[-1] == "step end"
    assert trace[1:1 + layers] == [f"fwd {i}" for i in range(layers)]
    backward = [w for w in trace if w.startswith("bwd")]
    assert backward == [f"bwd {i}" for i in reversed(range(layers))]  # each layer's backward, last layer first
    # A checkpoint rerun shows as a second forward of a layer where transformers' checkpoint wraps the module
    # call (5.17); where it wraps `forward` (5.23+) the hooks see only the first.
    assert all(w.startswith(("fwd", "bwd", "rerun")) for w in trace[1:-1])
    assert not callback.handles  # hooks removed after the traced step
