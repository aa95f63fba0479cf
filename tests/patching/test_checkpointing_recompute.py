"""patch_model(model, checkpointing="recompute"): whenever checkpointing is on, decoder layers run forward
without autograd and recompute in backward (torch's reentrant checkpoint with an anchor input). Same math as
the non-reentrant checkpoint transformers and TRL ask for, so gradients match it exactly (fp32, CPU); never
turns checkpointing on; falls back per call where the reentrant form would differ; reversible."""

import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import fastkern
from fastkern.patching.checkpointing import RecomputeCheckpointFunction, model_offloader
from tests.models import batch, tiny_model
from tests.patching.test_checkpointing import disable, enable, grads, layers


def recompute_only(model, **options):
    """patch_model with every other patcher off, so gradients compare checkpointing alone."""
    from fastkern.patching.core import _patchers

    return fastkern.patch_model(model, **({p.option: None for p in _patchers()} | {"checkpointing": "recompute"}
                                          | options))


def assert_exact(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=0, atol=0, msg=name)


def lora(model, seed=1):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_full_model_matches_non_reentrant_exactly(dropout):
    """Attention dropout included: the RNG state is restored for the recompute, as torch's checkpoint does."""
    ids = batch()
    model = tiny_model("llama", attention_dropout=dropout)
    enable(model, gc_kwargs={"use_reentrant": False})
    ref = grads(model, ids)
    report = recompute_only(model)
    assert len(report.patched_names("checkpointing")) == len(layers(model)) == 2, report
    assert all(isinstance(m._gradient_checkpointing_func, RecomputeCheckpointFunction) for m in layers(model))
    assert_exact(grads(model, ids), ref)
    assert model_offloader(model) is None


@pytest.mark.parametrize("input_grads", [False, True])
def test_lora_with_frozen_inputs_gets_every_adapter_gradient(input_grads):
    """Under LoRA the embedding is frozen, so a decoder layer's input does not require grad unless
    enable_input_require_grads was called: the anchor keeps the reentrant node in the graph either way."""
    ids = batch()
    plain = lora(tiny_model("llama"))
    enable(plain.get_base_model(), gc_kwargs={"use_reentrant": False})
    if input_grads:
        plain.enable_input_require_grads()
    ref = grads(plain, ids)
    model = lora(tiny_model("llama"))
    enable(model.get_base_model(), gc_kwargs={"use_reentrant": False})
    if input_grads:
        model.enable_input_require_grads()
    recompute_only(model)
    got = grads(model, ids)
    assert len(got[1]) == len(ref[1]) == sum(p.requires_grad for p in model.parameters())
    assert_exact(got, ref)


def test_with_the_default_patches_matches_non_reentrant_exactly():
    ids = batch()
    model = lora(tiny_model("llama"))
    fastkern.patch_model(model)
    enable(model.get_base_model(), gc_kwargs={"use_reentrant": False})
    ref = grads(model, ids)
    fastkern.unpatch_model(model)
    fastkern.patch_model(model, checkpointing="recompute")
    assert all(isinstance(m._gradient_checkpointing_func, RecomputeCheckpointFunction) for m in layers(model))
    assert_exact(grads(model, ids), ref)


def test_never_turns_checkpointing_on_but_follows_a_later_enable():
    ids = batch()
    model = tiny_model("llama")
    report = recompute_only(model)
    assert not any(m.gradient_checkpointing for m in layers(model))
    assert not report.patched_names("checkpointing")
    assert any("recompute" in note for note in report.notes)
    ref_model = tiny_model("llama")
    enable(ref_model, gc_kwargs={"use_reentrant": False})
    enable(model, gc_kwargs={"use_reentrant": False})  # as the Trainer or TRL would, after patching
    assert all(isinstance(m._gradient_checkpointing_func, RecomputeCheckpointFunction) for m in layers(model))
    assert_exact(grads(model, ids), grads(ref_model, ids))
    disable(model)
    enable(model)  # transformers' default kwargs
    assert all(isinstance(m._gradient_checkpointing_func, (RecomputeCheckpointFunction, functools.partial))
               for m in layers(model))


def test_unpatch_restores_the_requested_function():
    model = tiny_model("llama")
    enable(model, gc_kwargs={"use_reentrant": False})
    before = [m._gradient_checkpointing_func for m in layers(model)]
    recompute_only(model)
    fastkern.unpatch_model(model)
    after = [m._gradient_checkpointing_func for m in layers(model)]
    assert after == before and all(m.gradient_checkpointing for m in layers(model))
    enable(model, gc_kwargs={"use_reentrant": False})  # the class's own setter again
    assert not any(isinstance(m._gradient_checkpointing_func, RecomputeCheckpointFunction) for m in layers(model))


@pytest.mark.parametrize("gc_kwargs", [{"use_reentrant": True}, {"use_reentrant": False, "context_fn": object()},
                                       {"use_reentrant": False, "determinism_check": "none"}])
def test_functions_it_cannot_stand_in_for_are_kept(gc_kwargs):
    model = tiny_model("llama")
    report = recompute_only(model)
    enable(model, gc_kwargs=gc_kwargs)
    func = layers(model)[0]._gradient_checkpointing_func
    assert isinstance(func, functools.partial) and func.func is torch_checkpoint and func.keywords == gc_kwargs
    assert report is not None


class _Counting:
    """A stand-in for the replaced checkpoint function that records the calls routed back to it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, function, *args, **kwargs):
        self.calls += 1
        return torch_checkpoint(function, *args, use_reentrant=False, **kwargs)


def _layer_call(layer, weight_in_kwargs=None):
    def call(x, scale=None):
        return layer(x) * (1 if scale is None else scale)

    return functools.partial(call, scale=weight_in_kwargs) if weight_in_kwargs is not None else call


def test_per_call_fallbacks():
    layer = torch.nn.Linear(4, 4)
    fallback = _Counting()
    func = RecomputeCheckpointFunction({}, replaces=fallback)
    x = torch.randn(3, 4)
    # A tensor that requires grad among the keyword arguments: the reentrant form would not differentiate it.
    scale = torch.tensor(2.0, requires_grad=True)
    func(_layer_call(layer, scale), x).sum().backward()
    assert fallback.calls == 1 and scale.grad is not None
    # Autograd off: nothing to recompute.
    with torch.no_grad():
        func(layer.__call__, x)
    assert fallback.calls == 2
    # A frozen layer whose input does not require grad.
    frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    func(frozen.__call__, x)
    assert fallback.calls == 3
    # A trainable layer with an input that does not require grad: the reentrant path, gradients arrive.
    func(layer.__call__, x).sum().backward()
    assert fallback.calls == 3 and layer.weight.grad is not None
    want = torch.autograd.grad(layer(x).sum(), layer.weight)[0]
    layer.weight.grad = None
    func(layer.__call__, x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, want, rtol=0, atol=0)


def test_autograd_grad_raises_torchs_error_rather_than_a_silent_zero():
    layer = torch.nn.Linear(4, 4)
    func = RecomputeCheckpointFunction({}, replaces=_Counting())
    x = torch.randn(3, 4, requires_grad=True)
    out = func(layer.__call__, x).sum()
    with pytest.raises(RuntimeError, match="incompatible with .grad"):
        torch.autograd.grad(out, x)


def test_bf16_autocast_recompute_matches():
    """The recompute runs under the autocast state of the forward (torch's reentrant checkpoint saves it)."""
    ids = batch()
    model = tiny_model("llama")
    enable(model, gc_kwargs={"use_reentrant": False})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = grads(model, ids)
    recompute_only(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_exact(grads(model, ids), ref)


def test_distributed_runs_pass_the_layer_parameters_through_the_checkpoint(monkeypatch):
    # Under DDP (plain replicated parameters) the reentrant form is kept, with the layer's parameters as
    # checkpoint inputs and the rerun computing on the checkpoint's copies of them: each parameter's
    # gradient reaches it once, through the checkpoint node (tests/distributed/ check DDP itself).
    import fastkern.patching.checkpoint_functions as module

    layer = torch.nn.Linear(4, 4)
    weight, bias = layer.weight, layer.bias
    x = torch.randn(3, 4, requires_grad=True)
    fallback = _Counting()
    func = RecomputeCheckpointFunction({}, replaces=fallback)
    monkeypatch.setattr(module, "_distributed", lambda: True)
    accumulated = []
    weight.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.grad.clone()))
    func(layer.__call__, x).sum().backward()
    assert fallback.calls == 0 and len(accumulated) == 1  # reentrant; one accumulation
    assert layer.weight is weight and layer.bias is bias  # the parameters are back in their slots
    x2 = x.detach().clone().requires_grad_()
    ref = torch.nn.Linear(4, 4)
    ref.load_state_dict(layer.state_dict())
    ref(x2).sum().backward()
    torch.testing.assert_close(weight.grad, ref.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(bias.grad, ref.bias.grad, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("mark", ["ds_id", "_fsdp_flattened"])
def test_distributed_runs_with_sharded_parameters_keep_the_requested_function(monkeypatch, mark):
    # ZeRO-3 (ds_id) and FSDP1 (_fsdp_flattened) parameters, like FSDP2's DTensors, are not plain
    # replicated ones: the requested checkpoint runs.
    import fastkern.patching.checkpoint_functions as module

    layer = torch.nn.Linear(4, 4)
    setattr(layer.weight, mark, True)
    fallback = _Counting()
    func = RecomputeCheckpointFunction({}, replaces=fallback)
    monkeypatch.setattr(module, "_distributed", lambda: True)
    func(layer.__call__, torch.randn(3, 4)).sum().backward()
    assert fallback.calls == 1 and layer.weight.grad is not None
