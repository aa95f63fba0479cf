"""patch_model(moe="auto" | True): routed experts through fastkern.ops.moe_experts, router and aux loss untouched."""

import copy

import pytest
import torch

import fastkern
from fastkern.patching.context import fastkern_forward_kind
from tests.models import batch, tiny_model
from tests.oracle import assert_within_reference_rule, reference_rule_batches, train_for_reference_rule

MOE_FAMILIES = ["qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss"]
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


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
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
        runs.append((out, {n: p.grad.clone() for n, p in m.named_parameters()
                           if n.endswith(("gate.weight", "router.weight", "router.bias"))}))
    (want, want_grads), (got, got_grads) = runs
    # The first MoE layer sees the same hidden states: its router logits are bit-equal.
    assert torch.equal(got.router_logits[0], want.router_logits[0])
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-6, atol=0)
    # The aux loss is transformers' own function of the router logits, not recomputed by fastkern.
    cfg = model.config
    n_experts = cfg.num_local_experts if family in ("mixtral", "gpt_oss") else cfg.num_experts
    aux = modeling.load_balancing_loss_func(got.router_logits, n_experts, cfg.num_experts_per_tok, None)
    assert torch.equal(got.aux_loss, aux)
    # Routers are trained through the routing weights' gradient (and the aux loss).
    assert got_grads.keys() == want_grads.keys() and got_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_by_default_and_unpatch_restores():
    model = tiny_model("qwen3_moe")
    report = fastkern.patch_model(model)
    assert report.options["moe"] == "auto" and "model.layers.1.mlp.experts" in report.patched_names("moe")
    (_, experts), = _experts(model)
    assert fastkern_forward_kind(experts) == "moe"
    restored = fastkern.unpatch_model(model)
    assert "model.layers.1.mlp.experts" in restored.patched_names("moe")
    assert "forward" not in experts.__dict__ and not [k for k in experts.__dict__ if k.startswith("_fastkern_")]
    assert "moe" in str(restored)
    assert not fastkern.patch_model(model, moe=False).patched_names("moe")


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_auto_leaves_wide_experts_to_transformers(family):
    """moe="auto" skips experts wider than MOE_AUTO_MAX_INTERMEDIATE (where transformers' grouped_mm measured
    faster), saying so; moe=True patches them."""
    from fastkern.patching.moe import MOE_AUTO_MAX_INTERMEDIATE

    wide = MOE_AUTO_MAX_INTERMEDIATE + 8
    key = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    model = tiny_model(family, **{key: wide})
    names = [n for n, _ in _experts(model)]
    assert names
    report = fastkern.patch_model(model, **{**ONLY_MOE, "moe": "auto"})
    assert not report.patched_names("moe")
    details = {s.name: s.detail for s in report.skipped if s.kind == "moe"}
    assert set(details) == set(names)
    assert all(f"intermediate size {wide} > {MOE_AUTO_MAX_INTERMEDIATE}" in d for d in details.values())
    fastkern.unpatch_model(model)
    assert fastkern.patch_model(model, **ONLY_MOE).patched_names("moe") == names


@pytest.mark.parametrize("targets", [["mlp.experts.gate_up_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]])
def test_peft_lora_on_expert_parameters_runs_grouped(targets):
    """PEFT's ParamWrapper parametrizes the expert weights during its forward (W + s B A); the patched
    forward reads the adapted weights and the adapters get their gradients through PEFT's parametrization.
    One target gives PEFT's factor proxy (one baddbmm), two nested wrappers; adapters disabled: the base."""
    peft = pytest.importorskip("peft")
    ids = batch()

    def build():
        model = _eager_experts(tiny_model("qwen3_moe"))
        torch.manual_seed(5)
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=targets,
                              init_lora_weights=False)
        return peft.get_peft_model(model, cfg)

    def step(model):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref_model, model = build(), build()
    want_logits, want_grads = step(ref_model)
    report = fastkern.patch_model(model, **ONLY_MOE)
    details = [e.detail for e in report.patched if e.kind == "moe"]
    assert len(details) == len(_experts(ref_model)) and details and all("PEFT's LoRA on the expert parameters" in d for d in details), str(report)
    logits, grads = step(model)
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    expert_grads = [n for n in want_grads if "experts" in n]
    assert len(expert_grads) == 2 * len(targets) * len(_experts(ref_model)) and want_grads.keys() == grads.keys()
    for name, want in want_grads.items():
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-6, msg=name)
    with model.disable_adapter(), ref_model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_a_foreign_parametrization_on_expert_weights_keeps_the_class_forward():
    model = _eager_experts(tiny_model("qwen3_moe"))
    ids = batch()
    name, experts = _experts(model)[0]

    class Scale(torch.nn.Module):
        def forward(self, w):
            return w * 0.5

    torch.nn.utils.parametrize.register_parametrization(experts, "gate_up_proj", Scale())
    want = model(input_ids=ids).logits
    report = fastkern.patch_model(model, **ONLY_MOE)
    assert name not in report.patched_names("moe")
    assert any(e.kind == "moe" and "parametrization" in e.detail for e in report.skipped)
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


# gpt-oss: a tiny model whose experts exercise what the default init leaves idle: random biases (transformers
# initialises them to zero) and a SwiGLU limit the pre-activations pass (7.0 would never bind here).
GPT_OSS_LIMIT = 0.3


def _gpt_oss_active():
    model = _eager_experts(tiny_model("gpt_oss", dtype=torch.float64, swiglu_limit=GPT_OSS_LIMIT))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, experts in _experts(model):
            for bias in (experts.gate_up_proj_bias, experts.down_proj_bias):
                bias.copy_(0.2 * torch.randn(bias.shape, generator=gen, dtype=torch.float64))
    return model


def _binding_share(model, ids):
    """The share of gate and up pre-activations the clamps bind on in the model's first experts."""
    experts = _experts(model)[0][1]
    seen = []
    hook = experts.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    gu = torch.einsum("nh,ehj->nej", seen[0], experts.gate_up_proj) + experts.gate_up_proj_bias
    gate, up = gu[..., ::2], gu[..., 1::2]
    return (gate > GPT_OSS_LIMIT).double().mean().item(), (up.abs() > GPT_OSS_LIMIT).double().mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpt_oss_within_reference_rule(dtype):
    base = _gpt_oss_active()
    batches = reference_rule_batches(base.config.vocab_size, 2)
    assert all(0.02 < share < 0.9 for share in _binding_share(base, batches[0][0]))
    reference = train_for_reference_rule(copy.deepcopy(base), batches)
    plain = train_for_reference_rule(copy.deepcopy(base).to(dtype), batches)
    model = copy.deepcopy(base).to(dtype)
    report = fastkern.patch_model(model, moe=True)
    assert {n for n, _ in _experts(model)} == set(report.patched_names("moe")) != set(), report
    assert "interleaved gate/up, transposed weights, biases, clamped SwiGLU" in str(report)
    patched = train_for_reference_rule(model, batches)
    assert_within_reference_rule(patched, plain, reference, dtype)
    # The biases train: their updates are part of the compared ones, and nonzero.
    for _, experts in _experts(model):
        assert experts.gate_up_proj_bias.grad.abs().sum() > 0 and experts.down_proj_bias.grad.abs().sum() > 0


def test_gpt_oss_keyword_routing_arguments():
    # transformers passes the routing positionally; the class's own keyword names work too.
    model = _eager_experts(tiny_model("gpt_oss"))
    fastkern.patch_model(model, **ONLY_MOE)
    experts = _experts(model)[0][1]
    x, ids, w = torch.randn(5, 64), torch.tensor([[0, 1]] * 5), torch.rand(5, 2)
    torch.testing.assert_close(experts(x, router_indices=ids, routing_weights=w), experts(x, ids, w))
    with pytest.raises(TypeError, match="unexpected keyword"):
        experts(x, ids, w, top_k=2)


def _gpt_oss_skip_detail(edit):
    model = tiny_model("gpt_oss")
    for _, experts in _experts(model):
        edit(experts)
    report = fastkern.patch_model(model, **ONLY_MOE)
    assert not report.patched_names("moe")
    return [e.detail for e in report.skipped if e.kind == "moe"][0]


def test_gpt_oss_layout_checks_skip():
    assert "is_concatenated=True" in _gpt_oss_skip_detail(lambda e: setattr(e, "is_concatenated", True))
    assert "has_bias=False" in _gpt_oss_skip_detail(lambda e: setattr(e, "has_bias", False))
    extra = _gpt_oss_skip_detail(lambda e: e.register_parameter("scale", torch.nn.Parameter(torch.ones(4))))
    assert "['scale'] are not named" in extra
    assert "not finite" in _gpt_oss_skip_detail(lambda e: setattr(e, "limit", float("nan")))
    assert "negative" in _gpt_oss_skip_detail(lambda e: setattr(e, "limit", -1.0))
    assert "is not [4, 64]" in _gpt_oss_skip_detail(lambda e: setattr(e, "down_proj_bias", torch.nn.Parameter(
        torch.zeros(4, 63))))


def test_gpt_oss_probe_sees_the_clamps(monkeypatch):
    # An activation that differs from the spec only where the clamps bind (up not clamped): the tiny model's
    # pre-activations stay far below the limit 7, so only the probe's scaled inputs tell the two apart.
    from transformers.models.gpt_oss import modeling_gpt_oss

    def unclamped_up(self, gate_up):
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    monkeypatch.setattr(modeling_gpt_oss.GptOssExperts, "_apply_gate", unclamped_up)
    report = fastkern.patch_model(tiny_model("gpt_oss"), **ONLY_MOE)
    assert not report.patched_names("moe")
    assert "relative error" in [e for e in report.skipped if e.kind == "moe"][0].detail


@pytest.mark.parametrize("section, problem", [
    ('activation = "clamped_swiglu"\nalpha = "alpha"\n', "needs `alpha` and `limit`"),
    ('activation = "gelu"\n', "is not one of"),
    ('gate_up_order = "zigzag"\n', "gate_up_order 'zigzag'"),
    ('limit = "limit"\n', "belong to activation clamped_swiglu"),
])
def test_inconsistent_section_is_a_problem(monkeypatch, section, problem):
    from fastkern.patching import specs as spec_module

    spec = spec_module.parse_spec(
        'family = "mixtral"\n[moe_experts]\nclass = "MixtralExperts"\n' + section, "patches/mixtral.toml")
    monkeypatch.setattr(spec_module, "load_specs", lambda: (spec,))
    report = fastkern.patch_model(tiny_model("mixtral"), **ONLY_MOE)
    assert not report.patched_names("moe")
    assert any(problem in p for p in report.problems), report.problems


def test_set_experts_implementation_after_patching_is_honoured(monkeypatch):
    """model.set_experts_implementation(...) after patch_model(moe=True) runs what it asks for (the class
    forward's dispatcher), not fastkern's kernel; setting the patch-time value back returns to the kernel."""
    from fastkern.patching import moe as moe_patching

    model = tiny_model("qwen3_moe")
    (_, experts), = _experts(model)
    at_patch = experts.config._experts_implementation
    other = "batched_mm" if at_patch != "batched_mm" else "eager"
    assert fastkern.patch_model(model, **ONLY_MOE).patched_names("moe")
    calls = []
    grouped = moe_patching._grouped
    monkeypatch.setattr(moe_patching, "_grouped", lambda *a: calls.append(1) or grouped(*a))
    ids = batch()
    with torch.no_grad():
        model(input_ids=ids)
        assert calls, "the patched forward should run fastkern's kernel"
        calls.clear()
        model.set_experts_implementation(other)
        got = model(input_ids=ids).logits
        assert not calls, f"set_experts_implementation({other!r}) was ignored"
        want = copy.deepcopy(model)
        fastkern.unpatch_model(want)
        torch.testing.assert_close(got, want(input_ids=ids).logits)
        model.set_experts_implementation(at_patch)
        model(input_ids=ids)
        assert calls


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_probe_inputs_do_not_follow_the_default_device(family):
    """The probe draws every input from its CPU generator on the CPU and moves it to the experts' device:
    under another default device (a CUDA default with a CPU generator is an error in randperm; here meta,
    which CPU-only machines have) the inputs are the same real values."""
    from fastkern.patching import moe
    from fastkern.patching.probe import probe_generator
    from fastkern.patching.specs import load_specs

    spec = next(s for s in load_specs() if s.family == family)
    module = _experts(tiny_model(family))[0][1]
    layout = moe._layout(spec.sections["moe_experts"], type(module))
    want = moe._probe_inputs(module, layout, probe_generator())
    with torch.device("meta"):
        got = moe._probe_inputs(module, layout, probe_generator())
    for w, g in zip(want, got, strict=True):
        for a, b in zip(w, g, strict=True):
            assert b.device.type == "cpu" and torch.equal(a, b)
