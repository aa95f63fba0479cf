"""patch_model(loss=True) on every family: the fused loss equals the model's own loss and gradients,
logits are not built in a training step (returned in eval mode and under no_grad), num_items_in_batch /
softcap / logit scale are honoured; per instance; reversible."""

import gc

import pytest
import torch

import fastkern
from fastkern.integrations import trl as trl_hook
from fastkern.patching.core import fastkern_forward_kind
from tests.models import batch, families_with, tiny_model

OFF = dict(mlp=False, moe=False, lora=False, packing=False, rope=False, norm=False, tiled_mlp=False)


def run(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def labels_for(ids):
    labels = ids.clone()
    labels[0, :4] = -100
    return labels


def assert_same(out0, grads0, out1, grads1):
    torch.testing.assert_close(out1.loss, out0.loss, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", families_with("causal_lm"))
def test_family_same_loss_and_grads_without_logits(family):
    overrides = {"final_logit_softcapping": 0.7} if family in ("gemma2", "gemma3") else {}
    model = tiny_model(family, **overrides).train()  # a training step: the fused loss skips the logits
    ids = batch()
    labels = labels_for(ids)
    out0, grads0 = run(model, ids, labels)
    report = fastkern.patch_model(model, loss=True, **OFF)
    assert report.patched_names("loss") == [""], report
    if overrides:
        assert "softcap 0.7" in report.patched[0].detail
    assert fastkern_forward_kind(model) == "loss"
    out1, grads1 = run(model, ids, labels)
    assert out1.logits is None
    assert_same(out0, grads0, out1, grads1)
    with torch.no_grad():  # evaluation: the logits come back as the original forward gives them
        evaluated = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(evaluated.logits, out0.logits.detach(), rtol=1e-5, atol=1e-5)
    restored = fastkern.unpatch_model(model)
    assert [e.kind for e in restored.patched] == ["loss"]
    assert "forward" not in model.__dict__
    out2, _ = run(model, ids, labels)
    assert out2.logits is not None


def test_num_items_in_batch_and_shift_labels():
    model = tiny_model("llama")
    ids = batch(b=3, t=9)
    labels = labels_for(ids)
    out0, grads0 = run(model, ids, labels, num_items_in_batch=torch.tensor(40))
    fastkern.patch_model(model, loss=True, **OFF)
    out1, grads1 = run(model, ids, labels, num_items_in_batch=torch.tensor(40))
    assert_same(out0, grads0, out1, grads1)
    # Pre-shifted labels (context parallelism) without num_items: the mean over valid labels.
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    out2, grads2 = run(model, ids, None, shift_labels=shifted)
    ratio = 40 / (labels[:, 1:] != -100).sum()
    mean_like = out1.__class__(loss=out1.loss * ratio)
    assert_same(mean_like, {k: v * ratio for k, v in grads1.items()}, out2, grads2)


def test_logit_scale_from_config_and_return_logits():
    model = tiny_model("llama")
    model.config.logits_scaling = 4.0  # Granite-style: logits divided by it
    ids = batch()
    labels = labels_for(ids)
    fastkern.patch_model(model, loss=True, **OFF)
    out = model(input_ids=ids, labels=labels, return_logits=True)
    logits = model.lm_head(model.model(input_ids=ids).last_hidden_state) / 4.0
    torch.testing.assert_close(out.logits, logits)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 131), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_logits_to_keep_and_no_labels_is_the_original_forward():
    model = tiny_model("qwen2")
    ids = batch()
    plain = model(input_ids=ids, logits_to_keep=3).logits
    fastkern.patch_model(model, loss=True, **OFF)
    torch.testing.assert_close(model(input_ids=ids, logits_to_keep=3).logits, plain)


@pytest.mark.parametrize("keep", [1, 3, "positions", "mask"])
def test_logits_to_keep_with_labels_as_transformers(keep):
    """As transformers' loss: the targets are those of the kept positions; full-length labels with
    logits_to_keep != 0 raise there and here. Full-length labels used to be sliced after the shift,
    which gave loss 0.0 for logits_to_keep=1 (the shift's -100 was all that was kept)."""
    model = tiny_model("qwen2")
    ids = batch()
    labels = labels_for(ids)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    shifted[:, -1] = 7  # a real target at the last position, so logits_to_keep=1 has one per row
    if keep == "positions":
        keep = torch.tensor([[1, 4, 5], [0, 2, 9]])
        targets = torch.take_along_dim(shifted, keep, dim=1)
    elif keep == "mask":
        keep = torch.zeros(ids.shape, dtype=torch.bool)
        keep[0, 2:7] = keep[1, 1:4] = True
        targets = shifted[keep]
    else:
        targets = shifted[:, -keep:].contiguous()  # transformers views shift_labels flat
    want = model(input_ids=ids, labels=targets, shift_labels=targets, logits_to_keep=keep).loss
    with pytest.raises(ValueError):
        model(input_ids=ids, labels=labels, logits_to_keep=keep)
    fastkern.patch_model(model, loss=True, **OFF)
    got = model(input_ids=ids, labels=targets, shift_labels=targets, logits_to_keep=keep).loss
    assert torch.isfinite(want) and want.item() != 0.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=keep)


def test_bf16_model_within_tolerance_of_its_own_loss():
    model = tiny_model("gemma2", torch.bfloat16, final_logit_softcapping=2.0)
    ids = batch()
    labels = labels_for(ids)
    out0, grads0 = run(model, ids, labels)
    fastkern.patch_model(model, loss=True, **OFF)
    out1, grads1 = run(model, ids, labels)
    assert abs(out1.loss.item() - out0.loss.item()) < 1e-2 * abs(out0.loss.item())
    for name in grads0:
        g0, g1 = grads0[name].double(), grads1[name].double()
        assert (g1 - g0).norm() <= 3e-2 * g0.norm() + 1e-6, name


def test_per_instance_and_trl_registration_is_undone():
    gc.collect()  # models patched by earlier tests and dropped since: their registrations are dead refs
    a, b = tiny_model("llama"), tiny_model("llama")
    fastkern.patch_model(a, loss=True, **OFF)
    assert fastkern_forward_kind(b) is None
    if trl_hook.trl_version() is not None:
        assert trl_hook.is_registered(a) and trl_hook.installed()
    fastkern.unpatch_model(a)
    assert not trl_hook.is_registered(a)
    assert not trl_hook.installed()


def test_option_is_on_by_default_and_can_be_turned_off():
    model = tiny_model("llama")
    assert fastkern.patch_model(model, **OFF).patched_names("loss") == [""]
    assert fastkern_forward_kind(model) == "loss"
    other = tiny_model("llama")
    report = fastkern.patch_model(other, **OFF, loss=False)
    assert not report.patched_names("loss") and fastkern_forward_kind(other) is None


def test_unpatched_under_a_foreign_wrapper_falls_back_to_the_original():
    model = tiny_model("llama")
    ids = batch()
    fastkern.patch_model(model, loss=True, **OFF)
    captured = model.forward  # what a wrapper such as TRL's add_fused_lm_head keeps
    fastkern.unpatch_model(model)
    out = captured(input_ids=ids, labels=labels_for(ids))
    assert out.logits is not None and torch.isfinite(out.loss)
