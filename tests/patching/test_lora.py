"""patch_model(lora=True) on tiny PEFT LoRA models (dense and bitsandbytes NF4 bases): same logits,
loss and LoRA gradients as PEFT, call-time fallbacks, disable_adapter(), several adapters, unpatch."""

import copy
import importlib

import pytest
import torch
import torch.nn as nn

import fastkern
from fastkern.patching.lora import fused_lora_forward

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _tiny(family: str, dtype, intermediate_size=96):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
    else:
        cfg = transformers.Qwen3Config(head_dim=16, **common)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)


def _quantize_linears(model, quant_type="nf4"):
    bnb = pytest.importorskip("bitsandbytes")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, compress_statistics=True, quant_type=quant_type)
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False,
                                             compress_statistics=True, quant_type=quant_type)
                q = q.to("cpu")
                setattr(module, child_name, q)
    return model


def _peft(model, **kw):
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=kw.pop("dropout", 0.0),
                          init_lora_weights=False, **kw)
    return peft.get_peft_model(model, cfg)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def _count_fused_projections(monkeypatch) -> list:
    """A list that gets one entry per LoRA projection computed on the fused path, whether by its own
    lora_linear call or inside a lora_linear_group call (q/k/v, gate/up)."""
    calls = []
    single, group = fastkern.patching.lora.lora_linear, fastkern.patching.lora.lora_linear_group
    monkeypatch.setattr(fastkern.patching.lora, "lora_linear", lambda *a, **k: calls.append(1) or single(*a, **k))
    monkeypatch.setattr(fastkern.patching.lora, "lora_linear_group",
                        lambda x, projections: calls.extend([1] * len(projections)) or group(x, projections))
    return calls


def _compare(model, dtype, ids, monkeypatch):
    ref_logits, ref_loss, ref_grads = _run(model, ids)
    report = fastkern.patch_model(model, lora=True, loss=False)
    calls = _count_fused_projections(monkeypatch)
    got_logits, got_loss, got_grads = _run(model, ids)
    assert len(calls) == 14, "every LoRA layer must take the fused path"
    tol = TOL[dtype]
    assert _rel(got_logits, ref_logits) < tol
    assert abs(got_loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) == 2 * 7 * 2
    for name in ref_grads:
        assert _rel(got_grads[name], ref_grads[name]) < 5 * tol, name
    return report


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_lora_matches_peft(family, dtype, monkeypatch):
    model = _peft(_tiny(family, dtype))
    ids = torch.randint(0, 128, (2, 11))
    report = _compare(model, dtype, ids, monkeypatch)
    assert len(report.patched_names("lora")) == 14, str(report)
    fastkern.unpatch_model(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nf4_lora_matches_peft_bnb(dtype, monkeypatch):
    # Every in_features a multiple of the blocksize (64), as in real models: bitsandbytes 0.50.2's native
    # CPU dequantization, PEFT's forward here, is wrong for rows that blocks straddle (tests/bnb_reference.py).
    model = _peft(_quantize_linears(_tiny("llama", dtype, intermediate_size=128)))
    model.train()  # bitsandbytes repacks CPU weights for its own eval kernel; training keeps the format
    report = _compare(model, dtype, torch.randint(0, 128, (2, 9)), monkeypatch)
    assert len(report.patched_names("lora")) == 14, str(report)
    assert "nf4" in str(report)


def test_calls_take_fused_path():
    model = _peft(_tiny("llama", torch.float32))
    fastkern.patch_model(model, lora=True, loss=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.forward.__func__ is fused_lora_forward
    x = torch.randn(3, 64)
    calls = []
    original = fastkern.patching.lora.lora_linear
    try:
        fastkern.patching.lora.lora_linear = lambda *a, **k: calls.append(1) or original(*a, **k)
        layer(x)
        assert calls, "the patched layer did not call lora_linear"
        calls.clear()
        layer(x, adapter_names=["default"] * 3)  # PEFT's mixed-batch path: must fall back
        assert not calls
    finally:
        fastkern.patching.lora.lora_linear = original


def test_disable_adapter_scale_and_several_adapters():
    model = _peft(_tiny("llama", torch.float32))
    ids = torch.randint(0, 128, (1, 10))
    base = copy.deepcopy(model.base_model.model)
    for m in base.modules():  # the base model without LoRA: PEFT layers, adapters disabled
        if hasattr(m, "disable_adapters"):
            m._disable_adapters = True
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    fastkern.patch_model(model, lora=True, loss=False)
    with torch.no_grad():
        lora_logits = model(input_ids=ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
    assert _rel(disabled, base_logits) < 1e-6
    assert _rel(lora_logits, base_logits) > 1e-3  # the adapter changes the output
    # set_scale, and a second active adapter, are read at call time: compare with PEFT's own forward.
    model.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    for m in model.modules():
        if hasattr(m, "set_scale") and "default" in getattr(m, "scaling", {}):
            m.set_scale("default", 0.5)
    with torch.no_grad():
        patched = model(input_ids=ids).logits
        fastkern.unpatch_model(model)
        reference = model(input_ids=ids).logits
    assert _rel(patched, reference) < 2e-5


def test_state_changes_are_read_per_call():
    # The patched forward reads the attributes behind PEFT's properties (no cache): after every change
    # of adapters, scaling, enabling or merging, it fuses exactly when PEFT's math allows, and agrees
    # with PEFT's own forward.
    model = _peft(_tiny("llama", torch.float32))
    model.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    fastkern.patch_model(model, lora=True, loss=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 64)
    calls = []
    original = fastkern.patching.lora.lora_linear

    def check(fused: bool):
        # The properties PEFT's code uses and the attributes the patched forward reads agree.
        active = layer._active_adapter
        assert layer.active_adapters == ([active] if isinstance(active, str) else active)
        assert layer.disable_adapters is layer._disable_adapters
        assert layer.merged == bool(layer.merged_adapters)
        calls.clear()
        with torch.no_grad():
            got = layer(x)
            want = type(layer).forward(layer, x)
        assert bool(calls) == fused
        assert _rel(got, want) < 2e-5

    try:
        fastkern.patching.lora.lora_linear = lambda *a, **k: calls.append(1) or original(*a, **k)
        check(fused=True)
        layer.set_adapter("other")
        check(fused=True)
        layer.set_adapter(["default", "other"])
        check(fused=True)  # two adapters: one combined LoRA
        layer.set_adapter("default")
        layer.scaling["default"] = 0.25  # edited in place, as set_scale does
        check(fused=True)
        layer.enable_adapters(False)
        check(fused=False)
        layer.enable_adapters(True)
        layer.merge()
        check(fused=False)
        layer.unmerge()
        check(fused=True)
    finally:
        fastkern.patching.lora.lora_linear = original


def test_eval_dropout_fuses_and_late_base_hooks_fall_back():
    model = _peft(_tiny("llama", torch.float32), dropout=0.1)
    fastkern.patch_model(model, lora=True, loss=False)
    model.eval()  # dropout inactive: the fused path is exact
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(5, 64)
    calls = []
    original = fastkern.patching.lora.lora_linear
    try:
        fastkern.patching.lora.lora_linear = lambda *a, **k: calls.append(1) or original(*a, **k)
        with torch.no_grad():
            got = layer(x)
            assert calls and _rel(got, type(layer).forward(layer, x)) < 1e-6
            calls.clear()
            seen = []
            handle = layer.get_base_layer().register_forward_hook(lambda *a: seen.append(1))
            layer(x)  # a hook added after patching must run: PEFT's forward, not the fused one
            handle.remove()
            assert seen and not calls
    finally:
        fastkern.patching.lora.lora_linear = original


def test_dropout_falls_back_while_training():
    model = _peft(_tiny("llama", torch.float32), dropout=0.1)
    model.train()
    ids = torch.randint(0, 128, (1, 8))
    torch.manual_seed(3)
    ref = model(input_ids=ids).logits
    fastkern.patch_model(model, lora=True, loss=False, norm=False, mlp=False, rope=False, tiled_mlp=False)
    torch.manual_seed(3)
    got = model(input_ids=ids).logits
    assert torch.equal(got, ref)  # PEFT's own forward ran (same dropout masks)


def test_fp4_and_dora_skipped_with_reason():
    model = _peft(_quantize_linears(_tiny("llama", torch.float32), quant_type="fp4"))
    report = fastkern.patch_model(model, lora=True, loss=False)
    assert not report.patched_names("lora")
    assert "fp4" in str(report)
    dora = _peft(_tiny("llama", torch.float32), use_dora=True)
    report = fastkern.patch_model(dora, lora=True, loss=False)
    assert not report.patched_names("lora") and "variant" in str(report)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_autocast_in_the_weights_dtype_takes_the_fused_path(nf4, monkeypatch):
    # TRL's bf16=True on a bf16 model: accelerate runs the forward under bf16 autocast, which casts PEFT's
    # fp32 adapters and its fp32 copy of x back to bf16 for every product. The fused path computes the
    # same products in bf16, so it must be taken (not PEFT's forward) and match PEFT under autocast.
    base = _tiny("llama", torch.bfloat16, intermediate_size=128)
    model = _peft(_quantize_linears(base) if nf4 else base)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # as PEFT's autocast_adapter_dtype leaves them for a bf16 model
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, ref_loss, ref_grads = _run(model, ids)
    fastkern.patch_model(model, lora=True, loss=False)
    calls = _count_fused_projections(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_logits, got_loss, got_grads = _run(model, ids)
    assert len(calls) == 14, "every LoRA layer must take the fused path under bf16 autocast"
    assert _rel(got_logits, ref_logits) < TOL[torch.bfloat16]
    assert abs(got_loss.item() - ref_loss.item()) <= TOL[torch.bfloat16] * abs(ref_loss.item())
    assert ref_grads.keys() == got_grads.keys() and len(got_grads) == 28
    for name in ref_grads:
        assert got_grads[name].dtype == torch.float32, name  # gradients reach the fp32 adapters
        assert _rel(got_grads[name], ref_grads[name]) < 5 * TOL[torch.bfloat16], name
    # Autocast to another dtype than the weights' would change the base product: PEFT's forward runs.
    calls.clear()
    with torch.autocast("cpu", dtype=torch.float16):
        model(input_ids=ids, use_cache=False)
    assert calls == []


def test_nf4_under_autocast_with_fp32_compute_dtype_defers_to_peft(monkeypatch):
    # bitsandbytes' compute_dtype fp32 under bf16 autocast: PEFT + bitsandbytes multiply in bf16 (autocast
    # casts inside), the fused layer would multiply in fp32. Not the same math: PEFT's forward runs.
    model = _peft(_quantize_linears(_tiny("llama", torch.float32, intermediate_size=128)))
    model.train()
    fastkern.patch_model(model, lora=True, loss=False)
    calls = _count_fused_projections(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.randint(0, 128, (1, 8)), use_cache=False)
    assert calls == []


def test_nf4_state_repacked_for_cpu_after_fused_calls_defers_to_peft(monkeypatch):
    # bitsandbytes marks a QuantState it repacked for its CPU kernels with packing_format_for_cpu, on the
    # instance (read from its __dict__ for bitsandbytes' own class) or, for another class, wherever
    # getattr finds it. Set after fused calls, it must still send the call to PEFT's forward.
    model = _peft(_quantize_linears(_tiny("llama", torch.bfloat16, intermediate_size=128)))
    fastkern.patch_model(model, lora=True, loss=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    calls, to_peft, sentinel = [], [], object()
    original = fastkern.patching.lora.lora_linear
    monkeypatch.setattr(fastkern.patching.lora, "lora_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(fastkern.patching.lora, "_peft_forward", lambda *a, **k: to_peft.append(1) or sentinel)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    layer(x), layer(x)
    assert calls == [1, 1] and to_peft == []
    state = layer.base_layer.weight.quant_state
    state.packing_format_for_cpu = True
    assert layer(x) is sentinel and calls == [1, 1]
    state.packing_format_for_cpu = False
    layer(x)
    assert calls == [1, 1, 1]
    del state.packing_format_for_cpu
    state.__class__ = type("RepackedState", (type(state),), {"packing_format_for_cpu": True})
    assert layer(x) is sentinel and calls == [1, 1, 1]


def test_autocast_with_fp32_weights_defers_to_peft():
    # TRL's bf16=True trains fp32 weights under autocast; the patched layer must match PEFT there.
    peft = pytest.importorskip("peft")
    from tests.models import batch, tiny_model

    import fastkern

    model = tiny_model("llama")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    ids = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = pm(input_ids=ids, labels=ids).loss
    fastkern.patch_model(pm, lora=True, loss=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref, rtol=2e-2, atol=2e-2)


def _autocast_cuda_step(model, ids):
    """One training step as TRL's bf16=True runs it on a GPU: (loss, trainable parameters' gradients)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.gpu
@pytest.mark.parametrize("options", [
    dict(lora=True), dict(lora=True, checkpointing="offload"), dict(lora=True, norm=True),
    dict(loss=True, lora=True, norm=True, checkpointing="offload"),
], ids=lambda o: "+".join(f"{k}" if v is True else f"{k}={v}" for k, v in o.items()))
def test_gpu_bf16_model_under_autocast_with_checkpointing(options):
    # What TRL's bf16=True does to a bf16 PEFT model on a GPU: the forward under bf16 autocast, gradient
    # checkpointing on (non-reentrant, TRL's default). Patched loss and LoRA gradients match PEFT's.
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, vocab_size=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                       init_lora_weights=False))
    model.train()
    ids = torch.randint(0, 256, (2, 64), device="cuda")

    ref_loss, ref_grads = _autocast_cuda_step(model, ids)
    fastkern.patch_model(model, **options)
    loss, grads = _autocast_cuda_step(model, ids)
    assert abs(loss.item() - ref_loss.item()) <= 2e-2 * abs(ref_loss.item())
    for name in ref_grads:
        assert _rel(grads[name], ref_grads[name]) < 1e-1, name


@pytest.mark.gpu
def test_gpu_qlora_model_under_autocast_with_checkpointing():
    # TRL SFT with QLoRA on a GPU: NF4 bases, bf16 autocast, non-reentrant checkpointing, random lora_B,
    # head_dim 64 so torch picks its cuDNN attention. A strided dX from o_proj once sent that attention's
    # backward q/k/v gradients ~140% off (docs/nf4_lora.md): all adapters' gradients must match PEFT's.
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                                   num_attention_heads=16, num_key_value_heads=4, vocab_size=256)
    base = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model = _peft(_quantize_linears(base)).to("cuda")
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)  # TRL casts a quantized model's adapters to bf16
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, 256, (2, 512), device="cuda")

    ref_loss, ref_grads = _autocast_cuda_step(model, ids)
    report = fastkern.patch_model(model, lora=True, loss=False)
    assert len(report.patched_names("lora")) == 14, str(report)
    loss, grads = _autocast_cuda_step(model, ids)
    assert abs(loss.item() - ref_loss.item()) <= 2e-2 * abs(ref_loss.item())
    assert ref_grads.keys() == grads.keys() and len(grads) == 28
    for name in ref_grads:
        assert _rel(grads[name], ref_grads[name]) < 1e-1, name


def test_recompute_checkpointing_reuses_dequantized_nf4_weights(monkeypatch):
    """With checkpointing="recompute" (the default whenever checkpointing is on), each NF4 projection
    is dequantized twice per step (forward, rerun) instead of three times: the rerun's 16-bit weight
    serves its backward. Gradients are bit for bit those of dequantizing again."""
    lora_module = importlib.import_module("fastkern.ops.lora_linear")
    model = _peft(_quantize_linears(_tiny("llama", torch.bfloat16, intermediate_size=128)))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    report = fastkern.patch_model(model, loss=False)
    assert len(report.patched_names("lora")) == 14, str(report)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    calls = []
    original = lora_module.dequantize_into
    monkeypatch.setattr(lora_module, "dequantize_into", lambda out, *a, **k: calls.append(1) or original(out, *a, **k))
    _, reused_loss, reused = _run(model, ids)
    assert len(calls) == 2 * 14, len(calls)
    calls.clear()
    monkeypatch.setattr(lora_module, "REUSE_MAX_ROWS", 0)  # dequantize again in backward
    _, loss, grads = _run(model, ids)
    # Each layer's down_proj dequantizes twice either way: from the second rerun on it skips its product
    # (its output is never read, fastkern/patching/rerun_tail.py) and dequantizes only in backward.
    assert len(calls) == 3 * 14 - 2, len(calls)
    assert torch.equal(reused_loss, loss)
    assert reused.keys() == grads.keys() and len(grads) == 28
    for name in grads:
        assert torch.equal(reused[name], grads[name]), name
