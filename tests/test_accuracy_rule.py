"""Model-level accuracy of patch_model's defaults, judged against a high-precision run.

Fused code rounds differently from transformers' eager code, so "patched equals unpatched to 1e-4"
is the wrong test: it fails correct kernels whose rounding merely differs and says nothing about
which of the two is closer to the true result. The rule here (tests/oracle.py,
``assert_within_reference_rule``): train the same tiny model for a few steps three times from the
same weights and batches,

- the reference: unpatched, float64;
- unpatched in the dtype under test (fp32 or bf16);
- patched with the defaults (and with every option on) in that dtype;

and require, for the loss trajectory, the first step's gradients and the weight updates after the
last step, that the patched run's relative deviation from the reference is at most 1.05x the
unpatched run's plus a small floor. Full fine-tuning and LoRA (PEFT adapters on every linear layer),
every family in tests/models.py with a float64 run (not the MoE ones: grouped_mm has no float64).
"""

import copy

import pytest
import torch

import fastkern
from tests.models import FLOAT64_FAMILIES, family_spec, tiny_model
from tests.oracle import assert_within_reference_rule, reference_rule_batches, train_for_reference_rule

peft = pytest.importorskip("peft")

STEPS = 3
ALL_OPTIONS = dict(loss=True, lora=True, norm=True, mlp=True, rope=True, packing=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _with_lora(model):
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


def _three_runs(family, dtype, lora, options):
    base = tiny_model(family, dtype=torch.float64)
    if lora:
        base = _with_lora(base)
    batches = reference_rule_batches(base.config.vocab_size, STEPS)
    reference = train_for_reference_rule(copy.deepcopy(base), batches)
    plain = train_for_reference_rule(copy.deepcopy(base).to(dtype), batches)
    model = copy.deepcopy(base).to(dtype)
    report = fastkern.patch_model(model, **options)
    assert report.patched, f"nothing patched for {family}: {report}"
    patched = train_for_reference_rule(model, batches)
    return reference, plain, patched, report


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", FLOAT64_FAMILIES)
def test_defaults_fp32_within_reference_rule(family, lora):
    reference, plain, patched, report = _three_runs(family, torch.float32, lora, {})
    kinds = {e.kind for e in report.patched}
    # The loss, and the MLP where the family's spec has [mlp] (arcee's MLP is not gated, seed_oss's has a dropout).
    expected = {"loss", "mlp"} if "mlp" in family_spec(family).sections else {"loss"}
    assert expected <= kinds, f"defaults did not patch {sorted(expected - kinds)}: {report}"
    if lora:
        assert "lora" in kinds, f"defaults did not patch the LoRA layers: {report}"
    assert_within_reference_rule(patched, plain, reference, torch.float32)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_all_options_bf16_within_reference_rule(family, lora):
    reference, plain, patched, _ = _three_runs(family, torch.bfloat16, lora, ALL_OPTIONS)
    assert_within_reference_rule(patched, plain, reference, torch.bfloat16)


def test_rule_rejects_a_real_error():
    """The rule is not vacuous: a patched run with a 1% error in one layer's gradients fails it."""
    reference, plain, patched, _ = _three_runs("llama", torch.float32, False, {})
    broken = dict(patched, grads=patched["grads"] * 1.01)
    with pytest.raises(AssertionError, match="grads"):
        assert_within_reference_rule(broken, plain, reference, torch.float32)
