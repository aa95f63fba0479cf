"""patch_model's tiled_mlp option: with tiling forced on (and tiles of a few tokens), training runs stay as
close to a float64 run as untiled ones (every family, full and LoRA, under checkpointing); "auto" and
token thresholds decide per call; composes with the mlp patch; per instance, idempotent, reversible."""

import copy

import pytest
import torch

import fastkern
from fastkern.patching import tiled_mlp as tiled_module
from fastkern.patching.core import _patchers, fastkern_forward_kind
from fastkern.patching.tiled_mlp import tiled_fused_mlp_forward, tiled_mlp_forward
from tests.models import batch, families_with, tiny_model
from tests.oracle import assert_within_reference_rule, reference_rule_batches, train_for_reference_rule

TILE_ROWS = 4  # tiny models: force tiles of 4 tokens so every call runs in several tiles
# A spread of MLP shapes: silu and gelu(tanh), separate and fused gate_up projections (phi3, glm4), hybrid
# linear attention (qwen3_5). Every family with an [mlp] section is patched the same way; the whole list
# would cost minutes of CPU here.
FP32_FAMILIES = [f for f in ("llama", "qwen3", "gemma", "gemma2", "phi3", "glm4", "qwen3_5") if f in families_with("mlp")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of TILE_ROWS tokens for the tiny models' intermediate size (96) in any dtype up to fp64."""
    monkeypatch.setattr(tiled_module, "TILE_BYTES", TILE_ROWS * 96 * 2)


def mlp_modules(model):
    return [m for n, m in model.named_modules() if n.endswith(".mlp")]


def _assert_rule(tiled, untiled, reference, dtype):
    assert_within_reference_rule(tiled, untiled, reference, dtype)


def _count_rows(model):
    """Largest number of tokens any MLP projection input had, recorded from now on."""
    seen = []
    for m in mlp_modules(model):
        for child in m.children():
            if isinstance(child, torch.nn.Linear) or hasattr(child, "base_layer"):
                child.register_forward_hook(lambda mod, args, out: seen.append(args[0].numel() // args[0].shape[-1]))
                break
    return seen


def _runs(family, dtype, lora=False, gc=None):
    base = tiny_model(family, dtype=torch.float64)
    if lora:
        peft = pytest.importorskip("peft")
        torch.manual_seed(3)
        base = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                         lora_dropout=0.0, init_lora_weights=False))
    batches = reference_rule_batches(base.config.vocab_size, steps=2)
    reference = train_for_reference_rule(copy.deepcopy(base), batches)
    options = {} if gc is None else {"checkpointing": gc}
    untiled_model = copy.deepcopy(base).to(dtype)
    fastkern.patch_model(untiled_model, tiled_mlp=False, **options)
    untiled = train_for_reference_rule(untiled_model, batches)
    model = copy.deepcopy(base).to(dtype)
    report = fastkern.patch_model(model, tiled_mlp=True, **options)
    assert len(report.patched_names("tiled_mlp")) == 2, report
    seen = _count_rows(model)
    tiled = train_for_reference_rule(model, batches)
    assert seen and max(seen) <= TILE_ROWS, seen  # forward and backward recompute only ever saw tiles
    return reference, untiled, tiled


@pytest.mark.parametrize("family", FP32_FAMILIES)
def test_fp32_tiled_training_within_reference_rule(family, small_tiles):
    reference, untiled, tiled = _runs(family, torch.float32)
    _assert_rule(tiled, untiled, reference, torch.float32)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_bf16_tiled_training_within_reference_rule(family, small_tiles):
    reference, untiled, tiled = _runs(family, torch.bfloat16)
    _assert_rule(tiled, untiled, reference, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_tiled_training_within_reference_rule(dtype, small_tiles):
    reference, untiled, tiled = _runs("llama", dtype, lora=True)
    _assert_rule(tiled, untiled, reference, dtype)


def test_tiled_under_offloaded_checkpointing(small_tiles):
    reference, untiled, tiled = _runs("qwen3", torch.float32, gc="offload")
    _assert_rule(tiled, untiled, reference, torch.float32)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_moe_families_dense_mlps(family, small_tiles):
    """MoE families: their dense MLPs (qwen2_moe's shared expert, called on [tokens, H]; qwen3_moe's dense
    layer) are tiled; the experts are not (float64 has no grouped GEMM on CPU: compared with fp32 untiled)."""
    model = tiny_model(family)
    plain = copy.deepcopy(model)
    fastkern.patch_model(plain, tiled_mlp=False)
    report = fastkern.patch_model(model, tiled_mlp=True)
    assert report.patched_names("tiled_mlp"), report
    batches = reference_rule_batches(model.config.vocab_size, steps=2)
    got, want = train_for_reference_rule(model, batches), train_for_reference_rule(plain, batches)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_tiled_under_transformers_checkpointing(small_tiles):
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    for m in (model, plain):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fastkern.patch_model(plain, tiled_mlp=False)
    fastkern.patch_model(model, tiled_mlp=True)
    batches = reference_rule_batches(model.config.vocab_size, steps=2)
    got, want = train_for_reference_rule(model, batches), train_for_reference_rule(plain, batches)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_auto_and_thresholds_decide_per_call(monkeypatch):
    calls = []
    original = tiled_module.tiled_mlp
    monkeypatch.setattr(tiled_module, "tiled_mlp", lambda *a, **k: calls.append(a[1].shape) or original(*a, **k))
    ids = batch(t=11)  # 22 tokens per call

    def tiled_calls(**options):
        model = tiny_model("llama")
        fastkern.patch_model(model, **options)
        calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        return len(calls)

    assert tiled_calls() == 0  # "auto": 22 x 96 fp32 activations are far below AUTO_BYTES
    assert tiled_calls(tiled_mlp=21) == 2 and tiled_calls(tiled_mlp=22) == 0  # more than n tokens
    assert tiled_calls(tiled_mlp=True) == 2
    # "auto" switches on where one [tokens, intermediate] activation exceeds AUTO_BYTES
    monkeypatch.setattr(tiled_module, "AUTO_BYTES", 22 * 96 * 4 - 1)
    assert tiled_calls() == 2
    monkeypatch.setattr(tiled_module, "AUTO_BYTES", 22 * 96 * 4)
    assert tiled_calls() == 0


def test_auto_threshold_values():
    cfg = tiled_module.TiledMLPConfig(None, 14336, None, tiled_module.AUTO_BYTES, tiled_module.TILE_BYTES)
    bf16 = torch.empty(0, dtype=torch.bfloat16)
    # Llama-3.1-8B in bf16: tiles above 18,724 tokens per call; 16K-token steps stay untiled
    assert not tiled_module.should_tile(cfg, bf16.new_empty(1, 16384, 1))
    assert not tiled_module.should_tile(cfg, bf16.new_empty(1, 18724, 1))
    assert tiled_module.should_tile(cfg, bf16.new_empty(1, 18725, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 activations under bf16 autocast count 2 bytes
        assert not tiled_module.should_tile(cfg, torch.empty(1, 18724, 1))


def test_composes_with_mlp_patch_and_is_reversible(small_tiles):
    a, b = tiny_model("llama"), tiny_model("llama")
    report = fastkern.patch_model(a, tiled_mlp=True)
    assert "around the fused GLU forward" in str(report)
    for m in mlp_modules(a):
        assert m.forward.__func__.__code__ is tiled_fused_mlp_forward.__code__ and fastkern_forward_kind(m) == "mlp"
    assert all(fastkern_forward_kind(m) is None for m in mlp_modules(b))
    again = fastkern.patch_model(a, tiled_mlp=True)
    assert {e.detail for e in again.skipped if e.kind in ("mlp", "tiled_mlp")} == {"already patched"}
    c = copy.deepcopy(a)  # TRL's reference models: the patch goes with the copy, bound to its modules
    assert all(m.forward.__self__ is m for m in mlp_modules(c))
    fastkern.unpatch_model(a)
    assert all("forward" not in m.__dict__ and not any(k.startswith("_fastkern") for k in m.__dict__)
               for m in mlp_modules(a))
    # without the mlp patch it wraps the class forward
    report = fastkern.patch_model(b, mlp=False, tiled_mlp=True)
    assert "around the class forward" in str(report) and not report.patched_names("mlp")
    assert all(m.forward.__func__.__code__ is tiled_mlp_forward.__code__ and fastkern_forward_kind(m) == "tiled_mlp"
               for m in mlp_modules(b))
    ids = batch()
    with torch.no_grad():
        got = b(input_ids=ids).logits
        fastkern.unpatch_model(b)
        want = b(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_default_is_auto_and_short_calls_untouched():
    model = tiny_model("llama")
    ids = batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    others_off = {p.option: False for p in _patchers() if p.option != "tiled_mlp"}
    report = fastkern.patch_model(model, **others_off)
    assert report.options["tiled_mlp"] == "auto" and "(auto)" in str(report)
    assert report.patched_names() == report.patched_names("tiled_mlp") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_values_are_errors():
    for value in ("yes", -3, 2.5):
        with pytest.raises(ValueError, match="tiled_mlp must be"):
            fastkern.patch_model(tiny_model("llama"), tiled_mlp=value)


def test_token_mixing_mlp_is_skipped(monkeypatch):
    from transformers.models.llama import modeling_llama

    def mixing(self, x):  # not token-wise: tiles would change the result
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) + x.mean(dim=-2, keepdim=True)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", mixing)
    report = fastkern.patch_model(tiny_model("llama"), tiled_mlp=True)
    assert not report.patched_names("tiled_mlp")
    skips = [e.detail for e in report.skipped if e.kind == "tiled_mlp"]
    assert len(skips) == 2 and "tokens interact" in skips[0], report


def test_foreign_instance_forward_is_skipped():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: type(mlp).forward(mlp, x)
    report = fastkern.patch_model(model, tiled_mlp=True)
    assert report.patched_names("tiled_mlp") == ["model.layers.1.mlp"]
    assert "already overridden" in [e for e in report.skipped if e.kind == "tiled_mlp"][0].detail
