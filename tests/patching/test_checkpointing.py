"""patch_model(model, checkpointing="offload"): decoder layers checkpoint through the model's own
offloader, also when checkpointing is (re-)enabled later by the user, the Trainer or TRL; per instance;
reversible. On CPU the offloader is told to move CPU tensors too, so the whole path really runs."""

import copy
import functools
import tempfile
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import fastkern
from fastkern.patching.checkpointing import OffloadCheckpointFunction, OffloadRecomputeFunction, model_offloader
from tests.models import batch, tiny_model


def offload_only(model):
    """patch_model with every other patcher off, so gradients compare checkpointing alone."""
    from fastkern.patching.core import _patchers

    return fastkern.patch_model(model, **({p.option: None for p in _patchers()} | {"checkpointing": "offload"}))


def layer_names(report):
    """Decoder layers the report lists under checkpointing (the input embedding is listed too)."""
    return [n for n in report.patched_names("checkpointing") if ".layers." in n]


def layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable(model, **kwargs):
    """The model's own enable method: activation_checkpointing_enable on 5.23, gradient_... on 5.17."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        method = getattr(model, "activation_checkpointing_enable", None)
        if method is not None:
            method(activation_checkpointing_kwargs=kwargs.pop("gc_kwargs", None), **kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs.pop("gc_kwargs", None), **kwargs)


def disable(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def move_everything(model):
    offloader = model_offloader(model)
    offloader.min_bytes, offloader.offload_cpu_tensors = 0, True
    return offloader


def grads(model, ids, seed=7):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_offload_matches_plain_and_no_checkpointing(dropout):
    ids = batch()
    model = tiny_model("llama", attention_dropout=dropout)
    ref = grads(model, ids)
    enable(model, gc_kwargs={"use_reentrant": False})
    plain = grads(model, ids)
    disable(model)
    report = offload_only(model)
    assert len(layer_names(report)) == 2, report
    offloader = move_everything(model)
    got = grads(model, ids)
    assert_same(got, plain)
    assert_same(got, ref)
    got_accumulated = grads(model, ids)  # second step: buffers reused, no new allocation
    assert_same(got_accumulated, got)
    assert offloader.stats.calls == 4 and offloader.stats.offloaded == 4 and offloader.live_tensors == 0
    assert offloader.pool.allocations == 2


def test_patch_turns_checkpointing_on_and_unpatch_turns_it_off():
    model = tiny_model("llama")
    before = [dict(m.__dict__) for m in layers(model)]
    assert not any(m.gradient_checkpointing for m in layers(model))
    report = offload_only(model)
    assert all(m.gradient_checkpointing for m in layers(model))
    assert all(isinstance(m._gradient_checkpointing_func, OffloadRecomputeFunction) for m in layers(model))
    assert all(isinstance(m._gradient_checkpointing_func.fallback, OffloadCheckpointFunction) for m in layers(model))
    assert "turned on" in str(report)
    restored = fastkern.unpatch_model(model)
    assert len(layer_names(restored)) == 2, restored
    assert [dict(m.__dict__) for m in layers(model)] == before
    assert "_set_gradient_checkpointing" not in model.__dict__ and model_offloader(model) is None


@pytest.mark.parametrize("offload_flag", [False, True])
def test_enable_after_patch_keeps_offloading(offload_flag):
    ids = batch()
    model = tiny_model("llama")
    offload_only(model)
    offloader = move_everything(model)
    disable(model)  # what TRL does around generation ...
    assert not any(m.gradient_checkpointing for m in layers(model))
    enable(model, gc_kwargs={"use_reentrant": False}, offload=offload_flag)  # ... and after it
    funcs = [m._gradient_checkpointing_func for m in layers(model)]
    assert all(isinstance(f, OffloadRecomputeFunction) and f.offloader is offloader for f in funcs)
    assert funcs[0].checkpoint_kwargs == {} and funcs[0].fallback.offloader is offloader
    grads(model, ids)
    assert offloader.stats.calls == 2 and offloader.stats.offloaded == 2
    fastkern.unpatch_model(model)
    # Enabled by the user after patching: stays on, with the function the user asked for.
    assert all(m.gradient_checkpointing for m in layers(model))
    restored = layers(model)[0]._gradient_checkpointing_func
    assert isinstance(restored, functools.partial) and restored.keywords == {"use_reentrant": False}


def test_patch_when_already_enabled_restores_the_same_function():
    model = tiny_model("llama")
    enable(model, gc_kwargs={"use_reentrant": False, "preserve_rng_state": True})
    original = layers(model)[0]._gradient_checkpointing_func
    report = offload_only(model)
    assert "was on" in str(report)
    func = layers(model)[0]._gradient_checkpointing_func
    assert isinstance(func, OffloadRecomputeFunction) and func.checkpoint_kwargs == {"preserve_rng_state": True}
    again = offload_only(model)
    assert again.skipped and "already patched" in again.skipped[0].detail
    fastkern.unpatch_model(model)
    assert all(m._gradient_checkpointing_func is original and m.gradient_checkpointing for m in layers(model))


def test_per_instance_and_deepcopy():
    ids = batch()
    patched, other = tiny_model("llama"), tiny_model("llama")
    offload_only(patched)
    enable(other, gc_kwargs={"use_reentrant": False})
    assert isinstance(layers(other)[0]._gradient_checkpointing_func, functools.partial)
    clone = copy.deepcopy(patched)
    assert model_offloader(clone) is not model_offloader(patched)
    assert layers(clone)[0]._gradient_checkpointing_func.offloader is model_offloader(clone)
    move_everything(clone)
    grads(clone, ids)
    assert model_offloader(clone).stats.offloaded == 2 and model_offloader(patched).stats.calls == 0


def test_reentrant_request_is_kept_with_a_warning_and_bad_value_rejected():
    model = tiny_model("llama")
    offload_only(model)
    with pytest.warns(RuntimeWarning, match="reentrant"):
        enable(model, gc_kwargs={"use_reentrant": True})
    func = layers(model)[0]._gradient_checkpointing_func
    assert isinstance(func, functools.partial) and func.func is torch_checkpoint
    with pytest.raises(ValueError, match="checkpointing"):
        fastkern.patch_model(tiny_model("llama"), checkpointing="cpu")


def lora_model(peft):
    """A tiny llama with PEFT LoRA r4 on every linear layer."""
    return peft.get_peft_model(tiny_model("llama"),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def test_peft_model():
    peft = pytest.importorskip("peft")
    ids = batch()

    plain = lora_model(peft)
    enable(plain, gc_kwargs={"use_reentrant": False})
    ref = grads(plain, ids)
    model = lora_model(peft)
    report = offload_only(model)
    assert len(layer_names(report)) == 2, report
    offloader = move_everything(model)
    assert_same(grads(model, ids), ref)
    assert offloader.stats.offloaded == 2


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(40)]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.mark.slow
def test_trl_sft_trainer_gradient_checkpointing_runs_offloaded():
    """The documented TRL opt-in: patch the model, then hand it to SFTTrainer (gradient_checkpointing=True,
    TRL's default). Trainer.train enables checkpointing through the patched setter."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows = [" ".join(f"w{(s + 3 * i) % 40}" for i in range(20)) for s in range(16)]
    model = tiny_model("llama", vocab_size=43)
    offload_only(model)
    offloader = move_everything(model)
    disable(model)  # let the Trainer be the one that turns it on
    with tempfile.TemporaryDirectory() as out_dir:
        config = trl.SFTConfig(
            output_dir=out_dir, max_steps=2, per_device_train_batch_size=2, gradient_checkpointing=True,
            max_length=24, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, bf16=False,
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_dict({"text": rows}),
                                 processing_class=_tokenizer())
        assert not any(m.gradient_checkpointing for m in layers(trainer.model))
        trainer.train()  # Trainer.train enables checkpointing (transformers 5.17 and 5.23)
    assert all(isinstance(m._gradient_checkpointing_func, OffloadRecomputeFunction) for m in layers(model))
    n_layers = len(layers(model))
    assert offloader.stats.calls == 2 * n_layers, offloader.stats
    assert offloader.stats.offloaded == 2 * n_layers and offloader.stats.prefetched == 2 * (n_layers - 1)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_host_budget_option_and_report(monkeypatch):
    import fastkern.offload.offloader
    import fastkern.offload.pool

    for module in (fastkern.offload.offloader, fastkern.offload.pool):  # the budget, the per-buffer check
        monkeypatch.setattr(module, "_available_host_bytes", lambda: 8 << 30)
    from fastkern.patching.core import _patchers

    off = {p.option: None for p in _patchers()}
    model = tiny_model("llama")
    report = fastkern.patch_model(model, **(off | {"checkpointing": "offload"}))
    assert model_offloader(model).pool.max_bytes == 4 << 30  # half of the (fake) available RAM
    assert "4.00 GiB of host memory (0.5 of the RAM available now)" in str(report)
    fastkern.unpatch_model(model)
    report = fastkern.patch_model(model, **(off | {"checkpointing": {"offload": True, "host_bytes": 3 << 30}}))
    assert model_offloader(model).pool.max_bytes == 3 << 30 and "(host_bytes)" in str(report)
    fastkern.unpatch_model(model)
    fastkern.patch_model(model, **(off | {"checkpointing": {"offload": True, "host_fraction": 0.25, "min_bytes": 0}}))
    offloader = model_offloader(model)
    assert offloader.pool.max_bytes == 2 << 30 and offloader.min_bytes == 0
    fastkern.unpatch_model(model)


def test_host_budget_overflow_keeps_gradients_and_counts_bytes():
    ids = batch()
    model = tiny_model("llama")
    enable(model, gc_kwargs={"use_reentrant": False})
    plain = grads(model, ids)
    disable(model)
    from fastkern.patching.core import _patchers

    fastkern.patch_model(model, **({p.option: None for p in _patchers()} | {"checkpointing": {"offload": True, "host_bytes": 0}}))
    offloader = move_everything(model)
    with pytest.warns(RuntimeWarning, match="host budget of 0.00 GiB"):
        got = grads(model, ids)
    assert_same(got, plain)
    assert offloader.stats.offloaded == 0 and offloader.stats.kept_on_device == 2
    assert offloader.stats.bytes_kept_on_device == 2 * ids.numel() * model.config.hidden_size * 4


@pytest.mark.parametrize("value, match", [
    (True, "must be None, \"recompute\", \"offload\" or a dict"),
    ("plain", "must be None, \"recompute\", \"offload\" or a dict"),
    ({"host_bytes": 1}, "needs \"offload\": True"),
    ({"offload": False, "host_bytes": 1}, "needs \"offload\": True"),
    ({"offload": True, "host_gib": 1}, "unknown keys \\['host_gib'\\]"),
    ({"offload": True, "host_bytes": -1}, "host_bytes must be None or an int"),
    ({"offload": True, "host_bytes": 2.5e9}, "host_bytes must be None or an int"),
    ({"offload": True, "host_fraction": 2}, "host_fraction must be a number in"),
])
def test_bad_checkpointing_values(value, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        fastkern.patch_model(model, checkpointing=value)
    assert model_offloader(model) is None


@pytest.mark.parametrize("hooks_first", ["transformers", "fastkern"])
def test_frozen_embedding_output_is_not_held_through_backward(hooks_first):
    """TRL calls enable_input_require_grads() on PEFT models it trains with checkpointing: the embedding
    output becomes a leaf that autograd holds on the device until backward ends (plus a [T, H] .grad).
    Offloaded, it is released once layer 0 has stored its input on the host; gradients are unchanged."""
    peft = pytest.importorskip("peft")
    from torch.multiprocessing.reductions import StorageWeakRef

    ids = batch()

    plain = lora_model(peft)
    enable(plain, gc_kwargs={"use_reentrant": False})
    plain.enable_input_require_grads()
    ref = grads(plain, ids)

    model = lora_model(peft)
    if hooks_first == "transformers":
        model.enable_input_require_grads()
    report = offload_only(model)
    assert any(n.endswith("embed_tokens") for n in report.patched_names("checkpointing")), report
    if hooks_first == "fastkern":
        model.enable_input_require_grads()
    move_everything(model)
    embedding = model.get_input_embeddings()
    seen = {}

    def remember(module, args, output):
        seen["storage"] = StorageWeakRef(output.untyped_storage())
        seen["leaf"] = output.is_leaf

    def at_backward_start(grad):
        seen["held_in_backward"] = not seen["storage"].expired()

    final_norm = model.get_base_model().model.norm
    remember_handle = embedding.register_forward_hook(remember)
    final_norm.register_forward_hook(lambda module, args, output: output.register_hook(at_backward_start) and None)
    assert_same(grads(model, ids), ref)
    assert seen == {"storage": seen["storage"], "leaf": False, "held_in_backward": False}, seen
    assert embedding.weight.grad is None

    fastkern.unpatch_model(model)
    enable(model, gc_kwargs={"use_reentrant": False})
    grads(model, ids)
    assert seen["leaf"] and seen["held_in_backward"], "unpatched: transformers' leaf is back"
    remember_handle.remove()


def test_offload_recomputes_reentrant_and_falls_back_offloading():
    """checkpointing="offload" runs each layer as the recompute default does (forward without autograd,
    rerun in backward) with its input offloaded; where only the non-reentrant form is the same checkpoint
    (here a layer keyword argument that requires grad), the call goes to the offloading non-reentrant
    checkpoint, which offloads too. Gradients match the plain non-reentrant checkpoint either way."""
    ids = batch()
    model = tiny_model("llama")
    enable(model, gc_kwargs={"use_reentrant": False})
    plain = grads(model, ids)
    offload_only(model)
    offloader = move_everything(model)
    func = layers(model)[0]._gradient_checkpointing_func
    reentrant_calls, fallback_calls = [], []
    recompute = offloader.recompute
    offloader.recompute = lambda *a, **k: reentrant_calls.append(1) or recompute(*a, **k)
    fallback = func.fallback
    for m in layers(model):
        m._gradient_checkpointing_func.fallback = lambda *a, **k: fallback_calls.append(1) or fallback(*a, **k)
    assert_same(grads(model, ids), plain)
    assert len(reentrant_calls) == 2 and not fallback_calls and offloader.stats.offloaded == 2
    assert offloader.live_tensors == 0

    # A keyword argument that requires grad: only the non-reentrant checkpoint differentiates it.
    w = torch.randn(2, requires_grad=True)
    layer_fn = functools.partial(lambda h, scale: h * scale.sum(), scale=w)
    h = torch.randn(2, 8, 4, requires_grad=True)
    out = func(layer_fn, h)
    out.sum().backward()
    assert len(fallback_calls) == 1 and len(reentrant_calls) == 2
    torch.testing.assert_close(w.grad, torch.full((2,), h.sum().item()))


def test_offload_with_context_fn_keeps_the_nonreentrant_offloading_checkpoint():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    model = tiny_model("llama")
    offload_only(model)
    policy = functools.partial(create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    enable(model, gc_kwargs={"use_reentrant": False, "context_fn": policy})
    func = layers(model)[0]._gradient_checkpointing_func
    assert isinstance(func, OffloadCheckpointFunction) and "context_fn" in func.checkpoint_kwargs


def test_inputs_below_min_bytes_take_the_default_recompute_unhooked(monkeypatch):
    """checkpointing={"offload": True, "min_bytes": N}: a layer whose inputs would all stay on the device runs
    the default recompute checkpoint itself (the offloader sees no call); from N down it offloads. The same
    gradients either way."""
    from fastkern.patching.checkpoint_functions import RecomputeCheckpointFunction
    from fastkern.patching.core import _patchers

    ids = batch()
    model = tiny_model("llama")
    enable(model, gc_kwargs={"use_reentrant": False})
    plain = grads(model, ids)
    layer_input_bytes = ids.numel() * model.config.hidden_size * 4  # fp32 [B, T, H]
    calls = []
    original = RecomputeCheckpointFunction._reentrant
    monkeypatch.setattr(RecomputeCheckpointFunction, "_reentrant",
                        lambda self, *a: calls.append(type(self)) or original(self, *a))
    option = {"offload": True, "min_bytes": layer_input_bytes + 1}
    fastkern.patch_model(model, **({p.option: None for p in _patchers()} | {"checkpointing": option}))
    offloader = model_offloader(model)
    offloader.offload_cpu_tensors = True
    kept = grads(model, ids)
    assert offloader.stats.calls == 0 and calls == [OffloadRecomputeFunction] * 2
    offloader.min_bytes = layer_input_bytes  # now the layer inputs qualify: the offloader's own path
    moved = grads(model, ids)
    assert offloader.stats.calls == 2 and offloader.stats.offloaded >= 2 and len(calls) == 2
    assert_same(kept, plain)
    assert_same(moved, plain)
