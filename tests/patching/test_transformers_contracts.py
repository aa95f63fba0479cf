"""A patched model keeps the contracts of a transformers model, for every family in tests/models.py, with the
default options and with every option on.

The contracts are those transformers' own model tests and its users rely on: the attention implementation
the user set stays visible and settable, output_attentions works under eager, patching one model leaves
every other model (and the config they share) alone, forwards keep their signatures, patching works on
meta models and inside a meta-device block, it does not draw from the global RNG, checkpointing toggles
behave as unpatched, and torch.compile(fullgraph=True) traces the patched model.

The forwards here test the patch layer, not the kernels (tests/ops covers those): they run the ops on
their PyTorch reference path, which keeps this module cheap under the Triton interpreter. The compile
tests keep the default path and run on a few families only (tracing costs seconds per model).
"""

import copy
import inspect
import warnings

import pytest
import torch
import transformers

import fastkern
from fastkern.patching import packing as packing_module
from fastkern.patching.core import fastkern_forward_kind
from fastkern.runtime import force_reference
from tests.models import FAMILIES, model_from_config, tiny_config, tiny_model

ALL_ON = dict(loss=True, lora=True, norm=True, checkpointing="offload")
OPTIONS = {"default": {}, "all": ALL_ON}
CASES = [pytest.param(f, o, id=f"{f}-{o}") for f in FAMILIES for o in OPTIONS]
LENGTHS = [4, 1, 5, 3]  # a packed row of four documents, one of a single token


def patch(model, option):
    return fastkern.patch_model(model, **OPTIONS[option])


def user_attention(family):
    return tiny_config(family)._attn_implementation


def documents(vocab=131, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, n), generator=g) for n in LENGTHS]


def packed(docs):
    return torch.cat(docs, 1), torch.cat([torch.arange(d.shape[1]) for d in docs])[None]


def alone_logits(model, docs):
    with torch.no_grad(), force_reference():
        return torch.cat([model(input_ids=d).logits for d in docs], 1)


def packed_logits(model, docs, use_cache=True):
    ids, position_ids = packed(docs)
    with torch.no_grad(), force_reference():
        return model(input_ids=ids, position_ids=position_ids, use_cache=use_cache).logits


def packs(report) -> bool:
    """Whether packing patched the backbone (families without a [packing] section are left as they are)."""
    return any(e.kind == "packing" and "per-document attention, no [T, T] mask" in e.detail for e in report.patched)


def assert_close(got, want, tol=1e-4):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def registries():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return {name: dict(r._global_mapping) for name, r in (("attention", ALL_ATTENTION_FUNCTIONS),
                                                           ("mask", ALL_MASK_ATTENTION_FUNCTIONS))}


def class_attributes(model):
    return {cls: dict(vars(cls)) for m in model.modules() for cls in type(m).__mro__ if cls is not object}


# ---------------------------------------------------------------------------------------------------------
# Per instance: the config, the classes and the other models stay as they were.


@pytest.mark.parametrize("family,option", CASES)
def test_config_shared_by_three_models_stays_the_users(family, option):
    config = tiny_config(family)
    attn = config._attn_implementation
    a, b, c = (model_from_config(config) for _ in range(3))  # same config object, same weights
    docs = documents(config.vocab_size)
    want = alone_logits(a, docs)
    before = copy.deepcopy(vars(config))  # as construction and a forward left it
    shared = registries(), class_attributes(a)
    report_a = patch(a, option)
    assert vars(config) == before and config._attn_implementation == attn, "patch_model changed the config"
    assert (registries(), class_attributes(a)) == shared, "patch_model changed something shared"
    assert all(fastkern_forward_kind(m) is None and "forward" not in m.__dict__ for m in b.modules())
    reports = [report_a, patch(b, option), patch(c, option)]
    assert [r.patched_names() for r in reports[1:]] == [report_a.patched_names()] * 2, reports
    assert all("already patched" not in str(r) for r in reports), reports
    if packs(report_a):
        # With the cache on (the default), packed rows must not attend across documents, for every model.
        for model in (a, b, c):
            assert_close(packed_logits(model, docs), want)
    assert vars(config) == before


# ---------------------------------------------------------------------------------------------------------
# The attention implementation: what the user set, settable after patching, output_attentions under eager.


@pytest.mark.parametrize("family,option", CASES)
def test_set_attn_implementation_after_patch_keeps_packing(family, option, monkeypatch):
    model = tiny_model(family)
    attn = model.config._attn_implementation
    docs = documents()
    want = alone_logits(model, docs)
    report = patch(model, option)
    assert model.config._attn_implementation == attn
    assert all(getattr(m, "config", model.config)._attn_implementation == attn for m in model.modules())
    backends = []
    original = packing_module.document_attention
    monkeypatch.setattr(packing_module, "document_attention",
                        lambda *a, **k: backends.append(k["backend"]) or original(*a, **k))
    # Switch to eager and back; the packed path follows (eager math under "eager"). Families that run under
    # eager only stay there (transformers refuses sdpa for them).
    for implementation in ("eager", attn):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        backends.clear()
        got = packed_logits(model, docs)
        if packs(report):
            assert_close(got, want)
            assert backends and set(backends) == {"eager" if implementation == "eager" else "auto"}, backends


@pytest.mark.parametrize("family,option", CASES)
def test_output_attentions_under_eager(family, option):
    model = tiny_model(family)
    model.set_attn_implementation("eager")
    docs = documents()
    ids, position_ids = packed(docs)
    calls = [dict(input_ids=ids[:, :6]), dict(input_ids=ids, position_ids=position_ids, use_cache=False)]

    def attentions():
        with torch.no_grad(), force_reference():
            return [model(**kw, output_attentions=True).attentions for kw in calls]

    want = attentions()
    patch(model, option)
    assert model.config._attn_implementation == "eager"
    got = attentions()
    for g, w in zip(got, want):
        assert len(g) == len(w) >= 1  # one per softmax-attention layer (Qwen3.5's linear layers have none)
        for layer_g, layer_w in zip(g, w):
            assert_close(layer_g, layer_w)


# ---------------------------------------------------------------------------------------------------------
# Signatures.


@pytest.mark.parametrize("family,option", CASES)
def test_forward_signatures_are_kept(family, option):
    model = tiny_model(family)
    want = {name: inspect.signature(m.forward) for name, m in model.named_modules()}
    report = patch(model, option)
    assert report.patched, report
    got = {name: inspect.signature(m.forward) for name, m in model.named_modules()}
    # The model and its backbone: exactly (transformers' generate and Trainer read them).
    assert got[""] == want[""] and got["model"] == want["model"], (got[""], got["model"])
    # Every module: the same parameters (names, kinds, defaults), which is what callers bind by.
    changed = {name: (str(want[name]), str(got[name])) for name in want if parameters(got[name]) != parameters(want[name])}
    assert not changed, changed


def parameters(signature):
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


# ---------------------------------------------------------------------------------------------------------
# Meta device: inside a meta-device block, on meta models before to_empty()/loading, and after.


@pytest.mark.parametrize("family,option", CASES)
def test_patch_inside_a_meta_device_block(family, option):
    reference = tiny_model(family)
    model = tiny_model(family)
    with torch.device("meta"):
        report = patch(model, option)
    assert report.patched and not report.problems, report
    assert "not probed" not in str(report), report  # the model is on the CPU: its probes ran there
    assert all(p.device.type == "cpu" for p in model.parameters())
    ids = documents()[0]
    with torch.no_grad(), force_reference():
        assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("family,option", CASES)
def test_patch_a_meta_model_then_materialize_and_load(family, option):
    reference = tiny_model(family)
    config = tiny_config(family)
    with torch.device("meta"):
        model = model_from_config(config)
    report = patch(model, option)
    assert report.patched and not report.problems, report
    assert "not probed" in str(report), report  # meta weights have no values to compare
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    for name, buffer in reference.named_buffers():  # non-persistent buffers (rotary inv_freq) are not saved
        model.get_buffer(name).copy_(buffer)
    ids = documents()[2]
    with torch.no_grad(), force_reference():
        assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------------------
# Global RNG.


@pytest.mark.parametrize("family,option", CASES)
def test_global_rng_is_untouched(family, option):
    model = tiny_model(family)
    torch.manual_seed(1234)
    cuda = torch.cuda.is_available()
    want = torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None
    patch(model, option)
    fastkern.unpatch_model(model)
    assert torch.equal(torch.get_rng_state(), want[0]), "patch_model/unpatch_model drew from the CPU RNG"
    if cuda:
        assert all(torch.equal(g, w) for g, w in zip(torch.cuda.get_rng_state_all(), want[1]))


# ---------------------------------------------------------------------------------------------------------
# Checkpointing toggles.


def checkpoint_flags(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(enable|disable)` is deprecated:FutureWarning")
@pytest.mark.parametrize("family,option", CASES)
def test_checkpointing_toggles_behave_as_unpatched(family, option):
    model = tiny_model(family).train()
    patch(model, option)
    # checkpointing="offload" turns checkpointing on (documented); the toggles then work as without fastkern.
    assert all(checkpoint_flags(model)) == (option == "all")
    for enable, disable in ((model.gradient_checkpointing_enable, model.gradient_checkpointing_disable),
                            (model.activation_checkpointing_enable, model.activation_checkpointing_disable)):
        enable()
        assert all(checkpoint_flags(model)) and model.is_activation_checkpointing
        disable()
        assert not any(checkpoint_flags(model)) and not model.is_activation_checkpointing
    # Off means off: a training step does not call the checkpoint function; on again, it does.
    ids = documents()[0]
    for enabled in (False, True):
        if enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = spy_checkpoint_functions(model)
        with force_reference():
            model(input_ids=ids, labels=ids).loss.backward()
        assert bool(calls) == enabled


def spy_checkpoint_functions(model):
    calls = []
    for m in model.modules():
        if "_gradient_checkpointing_func" in m.__dict__:
            func = m._gradient_checkpointing_func
            m._gradient_checkpointing_func = lambda *a, _f=func, **k: calls.append(1) or _f(*a, **k)
    return calls


# ---------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): forward+backward, generate with a static cache. Tracing costs seconds per
# model under the interpreter, so one family here (the patch layer is the same code for every family; the
# families' own forwards are transformers'). aot_eager: what is checked is that Dynamo traces the patched
# model in one graph and AOTAutograd its backward, not Inductor's code generation.


def compile_counter():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    return CompileCounterWithBackend("aot_eager")


@pytest.mark.parametrize("option", list(OPTIONS))
def test_compile_fullgraph_forward_backward(option):
    model = tiny_model("llama").train()
    patch(model, option)
    ids = documents()[2]
    # use_cache=False: with checkpointing on, transformers itself logs a warning for use_cache (a graph break).
    want = model(input_ids=ids, labels=ids, use_cache=False).loss
    counter = compile_counter()
    got = torch.compile(model, fullgraph=True, backend=counter)(input_ids=ids, labels=ids, use_cache=False).loss
    got.backward()
    assert counter.frame_count == 1
    assert_close(got, want, 1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_compile_fullgraph_forward_backward_every_family(family):
    """The defaults on every other family: one graph forward, and a backward, under fullgraph=True
    (Dynamo + AOTAutograd only; the families' MoE and attention variants are what differs)."""
    model = tiny_model(family).train()
    patch(model, "default")
    ids = documents()[2]
    counter = compile_counter()
    got = torch.compile(model, fullgraph=True, backend=counter)(input_ids=ids, labels=ids, use_cache=False).loss
    got.backward()
    assert counter.frame_count == 1
    assert torch.isfinite(got)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_compiled_generate_with_static_cache_compiles_as_unpatched(option):
    ids = documents()[2]

    def generate(patched):
        model = tiny_model("llama")
        if patched:
            patch(model, option)
        want = [model.generate(ids[:, :n], max_length=9, do_sample=False) for n in (5, 3)]
        counter = compile_counter()
        model.forward = torch.compile(model.forward, fullgraph=True, backend=counter)
        got, frames = [], []
        for n in (5, 3):  # the second prompt is shorter: a new prefill graph, the decode graph is reused
            got.append(model.generate(ids[:, :n], max_length=9, do_sample=False, cache_implementation="static"))
            frames.append(counter.frame_count)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        return frames

    assert generate(patched=True) == generate(patched=False)
