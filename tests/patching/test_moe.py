"""patch_model(moe=True): routed experts through fastkern.ops.moe_experts, router and aux loss untouched."""

import copy

import pytest
import torch

import fastkern
from fastkern.patching.context import fastkern_forward_kind
from tests.models import batch, tiny_model
from tests.oracle import assert_within_reference_rule, reference_rule_batches, train_for_reference_rule

MOE_FAMILIES = ["qwen3_moe", "mixtral", "qwen2_moe"]
ONLY_MOE = dict(moe=True, mlp=False, norm=False, lora=False, rope=False, packing=False, loss=False, tiled_mlp=False)


def _eager_experts(model):
    """transformers' own per-expert loop (its grouped_mm path has no float64 kernel for the reference)."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    else:
        model.config._experts_implementation = "eager"
    return model


def _experts(model):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Experts")]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_full_finetune_fp32_within_reference_rule(family):
    base = _eager_experts(tiny_model(family, dtype=torch.float64))
    batches = reference_rule_batches(base.config.vocab_size, 2)
    reference = train_for_reference_rule(copy.deepcopy(base), batches)
    plain = train_for_reference_rule(copy.deepcopy(base).float(), batches)
    model = copy.deepcopy(base).float()
    report = fastkern.patch_model(model, moe=True)
    assert {n for n, _ in _experts(model)} == set(report.patched_names("moe")) != set(), report
    patched = train_for_reference_rule(model, batches)
    assert_within_reference_rule(patched, plain, reference, torch.float32)


def test_bf16_within_reference_rule():
    base = _eager_experts(tiny_model("qwen3_moe", dtype=torch.float64))
    batches = reference_rule_batches(base.config.vocab_size, 2)
    reference = train_for_reference_rule(copy.deepcopy(base), batches)
    plain = train_for_reference_rule(copy.deepcopy(base).bfloat16(), batches)
    model = copy.deepcopy(base).bfloat16()
    assert fastkern.patch_model(model, moe=True).patched_names("moe")
    patched = train_for_reference_rule(model, batches)
    assert_within_reference_rule(patched, plain, reference, torch.bfloat16)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_router_and_aux_loss_untouched(family):
    import importlib

    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    plain = _eager_experts(tiny_model(family)).train()
    model = copy.deepcopy(plain)
    assert fastkern.patch_model(model, **ONLY_MOE).patched_names("moe")
    ids = batch()
    runs = []
    for m in (plain, model):
        m.zero_grad(set_to_none=True)
        out = m(input_ids=ids, labels=ids, output_router_logits=True)
        (out.loss).backward()
        runs.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if n.endswith("gate.weight")}))
    (want, want_grads), (got, got_grads) = runs
    # The first MoE layer sees the same hidden states: its router logits are bit-equal.
    assert torch.equal(got.router_logits[0], want.router_logits[0])
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=0)
    # The aux loss is transformers' own function of the router logits, not recomputed by fastkern.
    cfg = model.config
    aux = modeling.load_balancing_loss_func(got.router_logits, cfg.num_local_experts if family == "mixtral"
                                   else cfg.num_experts, cfg.num_experts_per_tok, None)
    assert torch.equal(got.aux_loss, aux)
    # Routers are trained through the routing weights' gradient (and the aux loss).
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_off_by_default_and_unpatch_restores():
    model = tiny_model("qwen3_moe")
    report = fastkern.patch_model(model)
    assert report.options["moe"] is False and not report.patched_names("moe")
    fastkern.unpatch_model(model)
    fastkern.patch_model(model, moe=True)
    (_, experts), = _experts(model)
    assert fastkern_forward_kind(experts) == "moe"
    restored = fastkern.unpatch_model(model)
    assert "model.layers.1.mlp.experts" in restored.patched_names("moe")
    assert "forward" not in experts.__dict__ and not [k for k in experts.__dict__ if k.startswith("_fastkern_")]
    assert "moe" in str(restored)


def test_peft_lora_on_expert_parameters_falls_back():
    peft = pytest.importorskip("peft")
    model = _eager_experts(tiny_model("qwen3_moe"))
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"],
                          init_lora_weights=False)
    model = peft.get_peft_model(model, cfg)
    ids = batch()
    want = model(input_ids=ids).logits
    report = fastkern.patch_model(model, **ONLY_MOE)
    assert not report.patched_names("moe")
    (entry,) = [e for e in report.skipped if e.kind == "moe"]
    assert "PEFT" in entry.detail
    torch.testing.assert_close(model(input_ids=ids).logits, want)


def test_layout_and_activation_checks_skip():
    model = tiny_model("mixtral")
    for _, experts in _experts(model):
        experts.is_transposed = True  # as gpt-oss's experts are
    report = fastkern.patch_model(model, **ONLY_MOE)
    assert not report.patched_names("moe") and "is_transposed=True" in report.skipped[0].detail
    model = tiny_model("mixtral")
    for _, experts in _experts(model):
        experts.act_fn = torch.nn.GELU()
    report = fastkern.patch_model(model, **ONLY_MOE)
    assert not report.patched_names("moe") and "not silu" in report.skipped[0].detail


def test_probe_rejects_a_changed_experts_forward(monkeypatch):
    from transformers.models.mixtral import modeling_mixtral

    model = tiny_model("mixtral")
    original = modeling_mixtral.MixtralExperts.forward

    def doubled(self, *args, **kwargs):
        return 2 * original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_mixtral.MixtralExperts, "forward", doubled)
    report = fastkern.patch_model(model, **ONLY_MOE)
    assert not report.patched_names("moe")
    assert "relative error" in [e for e in report.skipped if e.kind == "moe"][0].detail
