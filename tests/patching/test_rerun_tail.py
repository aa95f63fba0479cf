"""A checkpointed layer's rerun skips the MLP's down projection where the layer ends `residual + mlp(x)`
(fastkern/patching/rerun_tail.py, fastkern/ops/unused_output.py). The skipped output is NaN-poisoned in
tests (tests/conftest.py), so any read of it would show in the gradients compared here."""

import sys

import pytest
import torch
import torch.nn as nn

import fastkern
from fastkern.ops.unused_output import linear_output_unused, output_unused, output_unused_taken
from fastkern.patching import rerun_tail
from tests.models import FAMILIES, MOE, batch, tiny_model
from tests.patching.test_checkpointing import enable, grads, layers

DENSE = [f for f in FAMILIES if f not in MOE]
# Layers whose MLP output goes straight into the final residual add (cohere adds attention and MLP
# outputs to the residual in one expression, which still ends in an add of the MLP's node).
# Phi-3's dropout on the MLP output, Seed-OSS's residual_dropout and StableLM's hidden_dropout are p = 0 in
# these configs (no autograd node; test_output_dropout_keeps_the_last_projection covers p > 0).
ENDS_IN_ADD = {"cohere", "cohere2", "ernie4_5", "gemma", "glm", "helium", "hunyuan_v1_dense", "llama", "ministral",
               "ministral3", "mistral", "olmo", "phi3", "qwen2", "qwen3", "qwen3_5", "seed_oss", "smollm3", "stablelm",
               "vaultgemma"}


def _lora(model, seed=1):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      lora_dropout=0.0))


def _two_steps(model, ids):
    """Gradients of two backward passes on the same weights: the first rerun of each layer computes
    everything and records, the second skips where the layer qualifies."""
    return grads(model, ids), grads(model, ids)


def _assert_close(got, ref, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got[0], ref[0], rtol=rtol, atol=atol)
    assert got[1].keys() == ref[1].keys() and got[1]
    for name in ref[1]:
        assert torch.isfinite(got[1][name]).all(), name
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=rtol, atol=atol, msg=name)


def _reference_and_patched(model, ids):
    """Gradients under torch's non-reentrant checkpoint (the reference), then two steps patched."""
    fastkern.patch_model(model, checkpointing=False)
    enable(model, gc_kwargs={"use_reentrant": False})
    ref = grads(model, ids)
    fastkern.unpatch_model(model)
    fastkern.patch_model(model)
    enable(model, gc_kwargs={"use_reentrant": False})
    first, second = _two_steps(model, ids)
    _assert_close(first, ref)
    _assert_close(second, ref)
    return ref, {rerun_tail.layer_skips(layer) for layer in layers(model)}


@pytest.mark.parametrize("family", DENSE)
def test_full_model_gradients_and_which_layers_skip(family):
    _, verdicts = _reference_and_patched(tiny_model(family), batch())
    assert verdicts == {family in ENDS_IN_ADD}, (family, verdicts)


def test_output_dropout_keeps_the_last_projection():
    """Seed-OSS with residual_dropout > 0: the dropout reads the down projection's values, so no layer skips
    it, and the rerun draws the forward's masks (the checkpoint restores the RNG) as torch's checkpoint does."""
    ids = batch()
    model = tiny_model("seed_oss", residual_dropout=0.25)
    ref, verdicts = _reference_and_patched(model, ids)
    assert verdicts == {False}
    # The dropout is live: another seed draws other masks and another loss.
    assert not torch.equal(grads(model, ids, seed=8)[0], ref[0])


def test_lora_and_frozen_down_projection_skip():
    ids = batch()
    model = _lora(tiny_model("llama"))
    fastkern.patch_model(model, checkpointing=False)
    enable(model.get_base_model(), gc_kwargs={"use_reentrant": False})
    ref = grads(model, ids)
    fastkern.unpatch_model(model)
    fastkern.patch_model(model)
    enable(model.get_base_model(), gc_kwargs={"use_reentrant": False})
    module = sys.modules["fastkern.ops.lora_linear"]
    take = module.take_output_unused
    taken = []

    def counting():
        got = take()
        if got:
            taken.append(got)
        return got

    module.take_output_unused = counting
    try:
        first, second = _two_steps(model, ids)
    finally:
        module.take_output_unused = take
    assert len(taken) == len(layers(model))  # each layer's down_proj LoRA call skipped in the second backward
    _assert_close(first, ref)
    _assert_close(second, ref)


def test_a_hook_on_the_layer_or_mlp_keeps_the_product():
    ids = batch()
    model = tiny_model("llama")
    fastkern.patch_model(model)
    enable(model, gc_kwargs={"use_reentrant": False})
    seen = []
    layer = layers(model)[0]
    handle = layer.mlp.register_forward_hook(lambda m, a, out: seen.append(torch.isfinite(out).all().item()))
    _two_steps(model, ids)
    handle.remove()
    assert seen and all(seen)  # forward, rerun, forward, rerun: never the unset output
    seen.clear()
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(torch.isfinite(out).all().item()))
    _two_steps(model, ids)
    handle.remove()
    assert seen and all(seen)


def test_a_layer_that_stops_qualifying_raises_rather_than_reading_unset_values():
    ids = batch()
    model = tiny_model("llama")
    fastkern.patch_model(model)
    enable(model, gc_kwargs={"use_reentrant": False})
    grads(model, ids)
    layer = layers(model)[0]
    assert rerun_tail.layer_skips(layer) is True
    scaled = layer.mlp.forward
    layer.mlp.forward = lambda x: scaled(x) * 2.0  # now the MLP's node is a multiply, not the add's input
    with pytest.raises(RuntimeError, match="no longer ends in"):
        grads(model, ids)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_output_unused_gradients(bias, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 7, generator=g, dtype=dtype).transpose(0, 1).requires_grad_()
    lin = nn.Linear(7, 6, bias=bias, dtype=dtype)
    dy = torch.randn(5, 3, 6, generator=g, dtype=dtype)
    out = linear_output_unused(x, lin.weight, lin.bias)
    assert out.shape == (5, 3, 6) and torch.isnan(out).all()  # poisoned: never computed
    got = torch.autograd.grad(out, [x, lin.weight, *([lin.bias] if bias else [])], dy)
    want = torch.autograd.grad(lin(x), [x, lin.weight, *([lin.bias] if bias else [])], dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)


def test_output_unused_is_consumed_by_one_lora_call_only():
    x = torch.randn(4, 8, requires_grad=True)
    w, a, b = torch.randn(6, 8), torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    want = fastkern.ops.lora_linear(x, w, a, b, 0.5)
    with output_unused():
        skipped = fastkern.ops.lora_linear(x, w, a, b, 0.5)
        assert output_unused_taken()
        again = fastkern.ops.lora_linear(x, w, a, b, 0.5)
    assert torch.isnan(skipped).all() and torch.equal(again, want)
    dy = torch.randn(4, 6)
    for got, ref in zip(torch.autograd.grad(skipped, [x, a, b], dy), torch.autograd.grad(want, [x, a, b], dy)):
        torch.testing.assert_close(got, ref)
    with torch.no_grad(), output_unused():  # without autograd the output is what the caller gets: computed
        torch.testing.assert_close(fastkern.ops.lora_linear(x, w, a, b, 0.5), want.detach())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_cuda_bf16_skipping_rerun_matches_torch_checkpoint(mode):
    """On the GPU in bf16 (Triton kernels, cuBLAS): the skipping rerun's gradients against torch's
    non-reentrant checkpoint of the same patched model."""
    ids = batch().cuda()

    def build():
        model = tiny_model("llama", dtype=torch.bfloat16).cuda()
        return _lora(model) if mode == "lora" else model

    def hf(model):
        return model.get_base_model() if mode == "lora" else model

    ref_model, model = build(), build()
    fastkern.patch_model(ref_model, checkpointing=False)
    enable(hf(ref_model), gc_kwargs={"use_reentrant": False})
    fastkern.patch_model(model)
    enable(hf(model), gc_kwargs={"use_reentrant": False})
    ref = grads(ref_model, ids)
    first, second = _two_steps(model, ids)
    assert {rerun_tail.layer_skips(layer) for layer in layers(hf(model))} == {True}
    for got in (first, second):
        torch.testing.assert_close(got[0], ref[0], rtol=1e-2, atol=1e-2)
        for name, want in ref[1].items():
            err = (got[1][name].float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
            assert torch.isfinite(got[1][name]).all() and err < 2e-2, (name, err.item())
