"""bench/e2e/grpo_dpo.py --tiny on the CPU: a DPO step in stock TRL, unpatched and patch_model(loss=True),
checked against each other in fp32, written as rows of the one schema."""

import math

import pytest

from bench import schema

pytest.importorskip("trl")
pytest.importorskip("peft")
from bench.e2e import grpo_dpo  # noqa: E402


@pytest.mark.slow
def test_tiny_dpo_rows(tmp_path):
    assert grpo_dpo.main(["--tiny", "--tasks", "dpo", "--out", str(tmp_path)]) == 0
    rows = schema.read(tmp_path / "grpo_dpo.json")
    assert [(r["case"], r["impl"]) for r in rows] == [("dpo step", "TRL 1.16 (unpatched)"),
                                                       ("dpo step", "fastkern.patch_model(loss=True)")]
    base, patched = rows
    for r in rows:
        assert r["error"] is None and r["ms"] > 0 and math.isfinite(r["loss"]) and r["throughput_unit"] == "tokens/s"
    # fastkern computed every log-prob (no call into TRL's own kernel) and matched the unpatched step in fp32.
    assert base["extra"]["trl_kernel_calls"] > 0 and patched["extra"]["trl_kernel_calls"] == 0
    assert patched["extra"]["fp32_loss_rel_err"] < grpo_dpo.FP32_TOLERANCE
    assert patched["extra"]["fp32_grad_rel_err"] < grpo_dpo.FP32_TOLERANCE


def test_variant_options():
    assert grpo_dpo.variant_options("defaults") == dict(loss=True)
    assert grpo_dpo.variant_options("defaults,lora,offload") == dict(loss=True, lora=True, checkpointing="offload")
    only = grpo_dpo.variant_options("loss,mlp")
    assert only["loss"] and only["mlp"] and not only["rope"]
    assert grpo_dpo.variant_options("defaults,-mlp") == dict(loss=True, mlp=False)
    assert grpo_dpo.variant_options("defaults,-checkpointing") == dict(loss=True, checkpointing=None)
    with pytest.raises(SystemExit, match="bad --variants item"):
        grpo_dpo.variant_options("nope")
    with pytest.raises(SystemExit, match="bad --variants item"):
        grpo_dpo.variant_options("-mlp")  # turning an option off needs the defaults it is taken from


def test_qk_norm_fusion_variants_switch_around_their_steps():
    from fastkern.patching import attention

    fused = grpo_dpo.variant_options("defaults,fused-qk-norm")
    assert fused == {"loss": True, grpo_dpo.QK_NORM_FUSION: True}
    assert grpo_dpo.variant_options("defaults,separate-qk-norm")[grpo_dpo.QK_NORM_FUSION] is False
    default = attention.FUSE_QK_NORM
    seen = []
    step = grpo_dpo.switched(lambda: seen.append(attention.FUSE_QK_NORM), fused)
    step()
    assert seen == [True] and attention.FUSE_QK_NORM == default
    plain = lambda: None  # noqa: E731
    assert grpo_dpo.switched(plain, dict(loss=True)) is plain and grpo_dpo.switched(plain, None) is plain
