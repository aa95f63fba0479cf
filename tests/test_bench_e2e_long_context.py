"""bench/e2e/long_context.py --tiny runs on CPU: one LoRA training step per length through the plain loop and
through TRL's SFTTrainer (padding-free), with a finite loss, the attention backend named, the schema rows and
the table written; the model shapes, including Qwen3-8B's, are built as named."""

import math

import pytest
import torch

from bench import schema

pytest.importorskip("peft")
from bench.e2e import long_context  # noqa: E402
from bench.e2e.long_context_step import backend_label  # noqa: E402


@pytest.mark.slow
def test_tiny_sweep_writes_rows_and_table(tmp_path, capsys):
    assert long_context.main(["--tiny", "--lengths", "48", "--tiled-mlp", "on", "--warmup-len", "16",
                              "--out", str(tmp_path)]) == 0
    (row,) = schema.read(tmp_path / "long_context.json")
    assert (row["op"], row["impl"], row["shape"]) == ("long_context", "long (tiled_mlp on)", "tiny x2 layers T48")
    assert row["case"] == "LoRA bf16 r16 train step" and "extrapolated" not in row
    assert row["error"] is None and row["ms"] > 0 and row["throughput_unit"] == "tokens/s" and row["loss"] > 0
    # on the CPU the peak is the tracked peak of live tensors: at least the model's own parameters
    params_mib = sum(p.numel() * p.element_size() for p in long_context.build_model(
        "tiny", None, 48, torch.device("cpu"), False).parameters()) / 2**20
    assert row["peak_scope"] == "host" and row["peak_mib"] > params_mib and row["extra"]["trainable_params"] > 0
    assert row["extra"]["attention_backend"].startswith("cpu flash") and row["extra"]["seq_len"] == 48
    assert "checkpointing" in row["extra"]["report"] and "tiled_mlp" in row["extra"]["report"]
    assert "| 48 | True |" in capsys.readouterr().out


@pytest.mark.slow
def test_trl_step_matches_the_loop_and_runs_patched(tmp_path):
    """TRL's padding-free step on one sequence trains what the plain loop trains: same model (seed), same ids,
    so the loss of the first step agrees; the long-context variant runs one TRL step through fastkern's
    offloaded checkpoints with a finite loss."""
    losses = {}
    for trainer in ("loop", "trl"):
        args = long_context.parse_args(["--tiny", "--variant", "unpatched", "--trainer", trainer])
        device, cap, stepper, out = long_context.setup(args, 40)
        row = long_context.probe(stepper, 40, device, cap)
        assert row["ok"] and row["error"] is None, row
        losses[trainer] = row["loss"]
    assert math.isfinite(losses["trl"]) and abs(losses["trl"] - losses["loop"]) <= 1e-2 * abs(losses["loop"]), losses

    assert long_context.main(["--tiny", "--trainer", "trl", "--lengths", "40", "--warmup-len", "16",
                              "--out", str(tmp_path)]) == 0
    (row,) = schema.read(tmp_path / "long_context.json")
    assert row["case"] == "LoRA bf16 r16 TRL SFT (padding-free) step" and row["impl"] == "long (tiled_mlp auto)"
    assert row["error"] is None and row["loss"] > 0 and row["ms"] > 0 and row["extra"]["trainer"] == "trl"
    assert "checkpointing" in row["extra"]["report"] and row["extra"]["attention_backend"] != "not recorded"


def test_oom_is_recognised_and_errors_become_rows():
    assert long_context.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert long_context.is_oom(torch.OutOfMemoryError("x"))
    assert not long_context.is_oom(ValueError("out of memory"))
    assert long_context.parse_args(["--size", "1b"]).lengths is None
    assert long_context.DEFAULT_LENGTHS["8b"] == [65536, 131072, 262144, 524288]
    result = dict(device_type="cpu", qlora=True, lora_r=16, variant="long", tiled_mlp="auto", size="8b", layers=2,
                  memory_cap_gib=80.0, trainable_params=1, report="", trainer="trl",
                  results=[dict(seq_len=524288, ok=False, error="out of memory")])
    (row,) = long_context.schema_rows(result)
    assert row["error"] == "out of memory" and row["ms"] is None
    assert row["case"] == "QLoRA NF4 r16 TRL SFT (padding-free) step" and row["extra"]["seq_len"] == 524288


def test_patch_options_per_variant():
    assert long_context.patch_options("unpatched") is None
    assert long_context.patch_options("defaults", "off") == {"tiled_mlp": False}
    assert long_context.patch_options("long") == {"tiled_mlp": "auto", "checkpointing": "offload"}
    assert long_context.patch_options("long", "on", 2.0)["checkpointing"] == {"offload": True, "host_bytes": 2 << 30}
    assert long_context.patch_options("long", "auto", None, 256)["checkpointing"] == {"offload": True,
                                                                                  "min_bytes": 256 << 20}


def test_qwen3_8b_shape_is_built_as_named():
    model = long_context.build_model("qwen3-8b", 2, 8192, torch.device("meta"), False)
    c = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM" and c.num_hidden_layers == 2
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.vocab_size) == (4096, 12288, 32, 8, 128, 151936)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 32 * 128 and attn.k_proj.out_features == 8 * 128 and hasattr(attn, "q_norm")
    assert long_context.SIZES["qwen3-8b"]["num_hidden_layers"] == 36
    for size in ("8b", "1b", "qwen3-8b"):  # the bench's shapes and the capacity planner's agree
        from fastkern.capacity import SIZES as PLANNED

        mine = long_context.SIZES[size]
        assert {k: mine[k] for k in PLANNED[size] if k in mine} == {k: v for k, v in PLANNED[size].items() if k in mine}


def test_backend_label_names_what_ran():
    assert backend_label(["aten::mm", "aten::_scaled_dot_product_flash_attention",
                          "aten::_scaled_dot_product_flash_attention_backward"]) == "flash"
    assert backend_label(["aten::_scaled_dot_product_efficient_attention",
                          "aten::_scaled_dot_product_attention_math"]) == "efficient + math"
    assert backend_label(["aten::_scaled_dot_product_cudnn_attention"]) == "cudnn"
    assert backend_label(["aten::_flash_attention_forward"]) == "varlen flash"
    assert backend_label(["aten::_scaled_dot_product_flash_attention_for_cpu"]).startswith("cpu flash")
    assert backend_label(["aten::bmm", "aten::softmax"]) == "none seen"
