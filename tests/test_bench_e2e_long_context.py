"""bench/e2e/long_context.py --tiny runs on CPU: one LoRA training step per length with the long-context
settings (offloaded checkpoints, tiled MLP forced on), a finite loss, the schema rows and the table written."""

import pytest

from bench import schema

pytest.importorskip("peft")
from bench.e2e import long_context  # noqa: E402


@pytest.mark.slow
def test_tiny_sweep_writes_rows_and_table(tmp_path, capsys):
    assert long_context.main(["--tiny", "--lengths", "48", "--tiled-mlp", "on", "--warmup-len", "16",
                              "--out", str(tmp_path)]) == 0
    (row,) = schema.read(tmp_path / "long_context.json")
    assert (row["op"], row["impl"], row["shape"]) == ("long_context", "long (tiled_mlp on)", "tiny x2 layers T48")
    assert row["error"] is None and row["ms"] > 0 and row["throughput_unit"] == "tokens/s" and row["loss"] > 0
    assert row["peak_scope"] == "host" and row["peak_mib"] > 0 and row["extra"]["trainable_params"] > 0
    assert "checkpointing" in row["extra"]["report"] and "tiled_mlp" in row["extra"]["report"]
    assert "| 48 | True |" in capsys.readouterr().out


def test_oom_is_recognised_and_errors_become_rows():
    assert long_context.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not long_context.is_oom(ValueError("out of memory"))
    assert long_context.parse_args(["--size", "1b"]).lengths is None
    assert long_context.DEFAULT_LENGTHS["8b"] == [65536, 131072, 262144, 524288]
    result = dict(device_type="cpu", qlora=True, lora_r=16, variant="long", tiled_mlp="auto", size="8b", layers=2,
                  memory_cap_gib=80.0, trainable_params=1, report="",
                  results=[dict(seq_len=524288, ok=False, error="out of memory")])
    (row,) = long_context.schema_rows(result)
    assert row["error"] == "out of memory" and row["ms"] is None and row["case"] == "QLoRA NF4 r16 train step"
