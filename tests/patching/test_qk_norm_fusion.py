"""Per-head q/k norms run inside the rope launch (fastkern.ops.rope_qk_norm) when rope and norm are both on.

Which attention modules fuse is decided per call (patching/attention.py, ``_fusable_qk_norm``): only where
fastkern's norm patcher bound both norms, with one form and eps, no hooks on them, one dtype for q, k
and both weights (trainable weights too unless ``FUSE_QK_NORM_TRAINABLE`` is off). Everything else takes
the three-launch path, with the same result up to rounding.
"""

import pytest
import torch

import fastkern
from fastkern.patching import attention as attention_module
from tests.models import batch, family_spec, families_with, tiny_model
from tests.models import logits_loss_grads as run
from tests.oracle import assert_same_fp32_run, assert_within_reference_rule

ROPE_AND_NORM = dict(mlp=False, loss=False, norm=True, rope=True)


@pytest.fixture(autouse=True)
def fusion_on(request, monkeypatch):
    """Every test here runs with the fusion switched on, trainable norm weights included (whatever the
    module's defaults), except those marked ``module_defaults``."""
    if "module_defaults" not in request.keywords:
        monkeypatch.setattr(attention_module, "FUSE_QK_NORM", True)
        monkeypatch.setattr(attention_module, "FUSE_QK_NORM_TRAINABLE", True)
FUSED_DETAIL = "per-head q/k norms in the same launch"


def _head_scope_norm_families():
    """Families whose attention normalises q and k per head and whose norm class fastkern patches."""
    out = []
    for family in families_with("attention"):
        spec = family_spec(family)
        attention = spec.sections["attention"]
        if attention.get("q_norm") and attention.get("qk_norm_scope", "head") == "head" and "norm" in spec.sections:
            out.append(family)
    return out


FUSING = _head_scope_norm_families()


def train_step(model, ids):
    """(loss, grads) of one step; with the loss patch on, a training call returns no logits."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


class CountingFusedCalls:
    """Counts calls of the fused op made by the attention patcher."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = attention_module.rope_qk_norm

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(attention_module, "rope_qk_norm", counting)


def test_the_usual_qk_norm_families_fuse():
    assert {"qwen3", "gemma3"} <= set(FUSING), FUSING


@pytest.mark.parametrize("family", FUSING)
def test_fused_qk_norm_fp32_same_run_as_unpatched(family, monkeypatch):
    ids = batch()
    want = run(tiny_model(family), ids)
    model = tiny_model(family)
    report = fastkern.patch_model(model, **ROPE_AND_NORM)
    rope_details = [e.detail for e in report.patched if e.kind == "rope"]
    rotating = [d for d in rope_details if "no rope in this layer" not in d]
    assert rotating and all(FUSED_DETAIL in d for d in rotating), rope_details
    spy = CountingFusedCalls(monkeypatch)
    assert_same_fp32_run(run(model, ids), want)
    assert spy.calls == len(rotating)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_fused_and_separate_launches_agree(family, monkeypatch):
    ids = batch()
    model = tiny_model(family)
    fastkern.patch_model(model, **ROPE_AND_NORM)
    fused = run(model, ids)
    monkeypatch.setattr(attention_module, "FUSE_QK_NORM", False)
    spy = CountingFusedCalls(monkeypatch)
    separate = run(model, ids)
    assert spy.calls == 0
    assert_same_fp32_run(fused, separate)


def test_norm_off_keeps_the_norm_modules(monkeypatch):
    ids = batch()
    want = run(tiny_model("qwen3"), ids)
    model = tiny_model("qwen3")
    report = fastkern.patch_model(model, mlp=False, loss=False, norm=False, rope=True)
    assert not any(FUSED_DETAIL in e.detail for e in report.patched if e.kind == "rope")
    spy = CountingFusedCalls(monkeypatch)
    assert_same_fp32_run(run(model, ids), want)
    assert spy.calls == 0


def test_a_hook_on_a_norm_keeps_its_call(monkeypatch):
    # A forward hook on q_norm must see q_norm's call: that layer then runs its norms as modules.
    ids = batch()
    want = run(tiny_model("qwen3"), ids)
    model = tiny_model("qwen3")
    fastkern.patch_model(model, **ROPE_AND_NORM)
    seen = []
    model.model.layers[0].self_attn.q_norm.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    spy = CountingFusedCalls(monkeypatch)
    assert_same_fp32_run(run(model, ids), want)
    assert len(seen) == 1
    assert spy.calls == len(model.model.layers) - 1


def test_mixed_dtypes_take_the_separate_path(monkeypatch):
    # fp32 norm weights under a bf16 model (Gemma's form casts its output back to the input's dtype, so
    # the attention still gets bf16 q, k, v): the fused op takes one dtype; the layer keeps its norm modules.
    ids = batch()
    model = tiny_model("gemma3", dtype=torch.bfloat16)
    fastkern.patch_model(model, **ROPE_AND_NORM)
    for layer in model.model.layers:
        layer.self_attn.q_norm.float()
        layer.self_attn.k_norm.float()
    spy = CountingFusedCalls(monkeypatch)
    logits, loss, grads = run(model, ids)
    assert spy.calls == 0
    assert torch.isfinite(loss) and torch.isfinite(logits).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_unpatch_restores_the_norm_calls(monkeypatch):
    ids = batch()
    model = tiny_model("qwen3")
    want = run(model, ids)
    fastkern.patch_model(model, **ROPE_AND_NORM)
    fastkern.unpatch_model(model)
    spy = CountingFusedCalls(monkeypatch)
    got = run(model, ids)
    assert spy.calls == 0
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


@pytest.mark.parametrize("family,lora", [("qwen3", True), ("qwen3", False), ("gemma3", True)])
def test_fused_bf16_within_reference_rule(family, lora):
    # The model-level rule (tests/test_accuracy_rule.py) with every option on and the fusion in use.
    from tests.test_accuracy_rule import ALL_OPTIONS, _three_runs

    reference, plain, patched, report = _three_runs(family, torch.bfloat16, lora, ALL_OPTIONS)
    assert any(FUSED_DETAIL in e.detail for e in report.patched if e.kind == "rope"), report
    assert_within_reference_rule(patched, plain, reference, torch.bfloat16)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_fused_packed_batch_equals_documents_alone(family, monkeypatch):
    # Packed documents (position_ids restart per document) through the fused launch: each document's
    # logits, loss and gradients as when it runs alone, unpatched.
    from tests.patching.test_packing import documents, run_alone, run_packed

    model = tiny_model(family)
    docs = documents()
    want = run_alone(model, docs, False)
    fastkern.patch_model(model, mlp=False, loss=False, norm=True, rope=True, packing=True)
    spy = CountingFusedCalls(monkeypatch)
    assert_same_fp32_run(run_packed(model, docs, False), want, loss_rtol=1e-5)
    assert spy.calls > 0


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_fused_decode_against_a_cache(monkeypatch):
    # Generation-style calls: a prefix fills the cache, one token decodes against it, with the fused launch.
    from tests.models import cache_kwargs, output_cache

    ids = batch(b=1, t=9)
    model = tiny_model("qwen3")

    def decode():
        with torch.no_grad():
            out = {}
            for name in cache_kwargs():
                prefix = model(input_ids=ids[:, :8], use_cache=True)
                out[name] = model(input_ids=ids[:, 8:], use_cache=True, **{name: output_cache(prefix)}).logits
            return out

    want = decode()
    fastkern.patch_model(model, **ROPE_AND_NORM)
    spy = CountingFusedCalls(monkeypatch)
    got = decode()
    assert spy.calls > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_fused_launch_under_compiled_layers(monkeypatch):
    # patch_model(compile=True) traces the attention forward with the fused op inside (its custom op):
    # one training step as the uncompiled fused model takes it.
    import copy

    base = tiny_model("qwen3").train()
    ids = batch()
    eager, compiled = copy.deepcopy(base), copy.deepcopy(base)
    fastkern.patch_model(eager)
    fastkern.patch_model(compiled, compile=True)
    torch._dynamo.reset()
    spy = CountingFusedCalls(monkeypatch)
    loss0, grads0 = train_step(eager, ids)
    calls_eager = spy.calls
    loss1, grads1 = train_step(compiled, ids)
    assert calls_eager > 0 and spy.calls > calls_eager  # the compiled layers traced through the fused call
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.module_defaults
def test_by_default_trainable_and_frozen_norms_fuse(monkeypatch):
    # patch_model's defaults: the fused launch whether the norm weights train (full fine-tuning) or are
    # frozen (LoRA, QLoRA); decided per call from requires_grad, same loss either way.
    ids = batch()
    model = tiny_model("qwen3")
    fastkern.patch_model(model)
    spy = CountingFusedCalls(monkeypatch)
    want, _ = train_step(tiny_model("qwen3"), ids)
    got, _ = train_step(model, ids)
    assert spy.calls == len(model.model.layers)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for layer in model.model.layers:
        layer.self_attn.q_norm.weight.requires_grad_(False)
        layer.self_attn.k_norm.weight.requires_grad_(False)
    got, _ = train_step(model, ids)
    assert spy.calls == 2 * len(model.model.layers)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.module_defaults
def test_by_default_a_lora_model_fuses(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("qwen3"), LoraConfig(r=4, target_modules="all-linear"))
    report = fastkern.patch_model(model)
    assert any(FUSED_DETAIL in e.detail for e in report.patched if e.kind == "rope"), report
    spy = CountingFusedCalls(monkeypatch)
    train_step(model, batch())
    assert spy.calls == len(model.base_model.model.model.layers)
