"""call_projections: a patched attention's q/k/v and MLP's gate/up LoRA layers run as one lora_linear_group
call when each would take the fused path, and as separate module calls whenever one could not (hooks,
dropout, a target left out, another compute dtype); the model's outputs and gradients match PEFT."""

import pytest
import torch

import fastkern
import fastkern.patching.lora as lora_patching
from tests.patching.test_lora import TARGETS, _quantize_linears, _rel, _run, _tiny

peft = pytest.importorskip("peft")


def _record_groups(monkeypatch) -> list:
    """One entry per lora_linear_group call: how many projections it computed."""
    sizes = []
    group = lora_patching.lora_linear_group
    monkeypatch.setattr(lora_patching, "lora_linear_group",
                        lambda x, projections: sizes.append(len(projections)) or group(x, projections))
    return sizes


def _patched_and_reference(dtype=torch.float32, nf4=False, targets=TARGETS, dropout=0.0):
    base = _tiny("llama", dtype, intermediate_size=128)
    base = _quantize_linears(base) if nf4 else base
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=dropout, init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    model.train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = _run(model, ids)
    fastkern.patch_model(model, lora=True, loss=False)
    return model, ids, reference


def _assert_same(got, reference, tol):
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = got, reference
    assert _rel(logits, ref_logits) < tol and abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert _rel(grads[name], ref_grads[name]) < 5 * tol, name


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_qkv_and_gate_up_grouped(monkeypatch, nf4):
    dtype = torch.bfloat16 if nf4 else torch.float32
    model, ids, reference = _patched_and_reference(dtype, nf4)
    sizes = _record_groups(monkeypatch)
    _assert_same(_run(model, ids), reference, 2e-2 if nf4 else 2e-5)
    assert sizes == [3, 2] * 2  # per layer: q/k/v, gate/up (o_proj and down_proj alone)


def test_switch_calls_each_projection(monkeypatch):
    model, ids, reference = _patched_and_reference()
    sizes = _record_groups(monkeypatch)
    monkeypatch.setattr(lora_patching, "GROUP_PROJECTIONS", False)
    _assert_same(_run(model, ids), reference, 2e-5)
    assert sizes == []


def test_targets_left_out_are_called_as_modules(monkeypatch):
    # PEFT on q_proj and v_proj only (a common configuration): k_proj is a plain Linear between them.
    model, ids, reference = _patched_and_reference(targets=["q_proj", "v_proj", "up_proj"])
    sizes = _record_groups(monkeypatch)
    _assert_same(_run(model, ids), reference, 2e-5)
    assert sizes == [2, 2]  # q and v grouped; up alone next to a plain gate_proj is a single call


@pytest.mark.parametrize("where", ["module forward hook", "module pre-hook", "module backward hook",
                                   "global forward hook"])
def test_hooks_keep_module_calls(monkeypatch, where):
    model, ids, reference = _patched_and_reference()
    layer = model.base_model.model.model.layers[0]
    seen = []
    if where == "module forward hook":
        handle = layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    elif where == "module pre-hook":
        handle = layer.mlp.up_proj.register_forward_pre_hook(lambda m, i: seen.append(i[0].shape))
    elif where == "module backward hook":
        handle = layer.self_attn.q_proj.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(1))
    sizes = _record_groups(monkeypatch)
    try:
        got = _run(model, ids)
    finally:
        handle.remove()
    _assert_same(got, reference, 2e-5)
    assert seen, "the hook must run"
    if where == "global forward hook":
        assert sizes == []
    elif where == "module pre-hook":
        assert sizes == [3, 3, 2]  # layer 0's gate/up: up is called as a module, gate alone
    else:
        assert sizes == [2, 2, 3, 2]  # layer 0's q/k/v: the hooked one as a module, the other two grouped


def test_active_dropout_and_disabled_adapters_take_peft(monkeypatch):
    model, ids, _ = _patched_and_reference(dropout=0.1)
    sizes = _record_groups(monkeypatch)
    model.train()
    _run(model, ids)
    assert sizes == []  # dropout active: every projection is PEFT's own forward
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert sizes == [3, 2] * 2  # dropout inactive in eval: grouped
    sizes.clear()
    with model.disable_adapter(), torch.no_grad():
        out = model(input_ids=ids).logits
    assert sizes == []
    base = model.get_base_model()
    with model.disable_adapter(), torch.no_grad():
        lora_patching.GROUP_PROJECTIONS = False
        try:
            plain = base(input_ids=ids).logits
        finally:
            lora_patching.GROUP_PROJECTIONS = True
    assert torch.equal(out, plain)


def test_recompute_checkpointing_grouped(monkeypatch):
    # The default checkpointing reruns each layer in backward: the rerun groups as the forward did.
    model, ids, reference = _patched_and_reference()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fastkern.unpatch_model(model)
    fastkern.patch_model(model, lora=True, loss=False)
    sizes = _record_groups(monkeypatch)
    _assert_same(_run(model, ids), reference, 2e-5)
    assert sizes == [3, 2] * 4  # forward (no grad) and rerun (with grad), 2 layers each
