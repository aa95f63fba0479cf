"""fastkern.plan_memory: the memory model's internal consistency and its exactly checkable terms.

What a CPU can check exactly: the weights term against the parameter bytes of real (tiny) models,
the NF4 term against bitsandbytes' storage of quantized weights, the LoRA term against PEFT's parameter
count, the tiling rule against the patcher's. The device-side activation terms are predictions that
only a GPU measurement can validate; here they are checked for monotonicity and for a longest-sequence
answer that sits exactly on the fit / no-fit boundary.
"""

import pytest
import torch
import transformers

import fastkern
from fastkern.capacity import (SIZES, Shape, _tiled, lora_params, nf4_bytes, pinned_bytes, plan_memory,
                               weight_bytes)
from fastkern.ops.tiled_mlp import tile_rows

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


def _config(family: str, **extra):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}[family]
    return cls(**{**TINY, **extra})


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("family, extra", [
    ("llama", {}), ("llama", {"tie_word_embeddings": True}), ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"head_dim": 32}), ("mistral", {}), ("qwen2", {}), ("qwen3", {"head_dim": 24}),
])
def test_weights_term_equals_the_model_parameter_bytes(family, extra):
    config = _config(family, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert weight_bytes(Shape.of(model)) == _param_bytes(model)
    assert weight_bytes(Shape.of(config)) == _param_bytes(model)


@pytest.mark.parametrize("fan_in, fan_out", [(64, 128), (192, 320), (4096, 1024), (64 * 300, 64)])
def test_nf4_bytes_equal_bitsandbytes_storage(fan_in, fan_out):
    bnb = pytest.importorskip("bitsandbytes")
    weight = bnb.nn.Params4bit(torch.randn(fan_out, fan_in, dtype=torch.bfloat16), requires_grad=False,
                               quant_type="nf4", compress_statistics=True).to("cpu")
    state = weight.quant_state
    stored = [weight.data, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    assert nf4_bytes(fan_in * fan_out) == sum(t.numel() * t.element_size() for t in stored)


def test_qlora_weights_and_lora_params_match_a_quantized_peft_model():
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    model = transformers.LlamaForCausalLM(_config("llama")).to(torch.bfloat16)
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4")
                    setattr(parent, name, q.to("cpu"))
    stored = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            stored += p.numel() * p.element_size()
            state = getattr(p, "quant_state", None)
            if state is not None:
                stored += sum(t.numel() * t.element_size()
                              for t in (state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code))
    shape = Shape.of(model)
    assert weight_bytes(shape, qlora=True) == stored
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert lora_params(shape, 4) == sum(p.numel() for p in trainable)
    assert all(p.dtype == torch.float32 for p in trainable)  # the 16 B/param of LORA_BYTES_PER_PARAM
    assert Shape.of(lora) == shape  # a PEFT model gives its base model's shape


def test_tiling_rule_matches_the_patcher_and_tile_bound_holds():
    shape = Shape.of("8b")
    assert not _tiled("auto", 18724, shape) and _tiled("auto", 18725, shape)  # docs: above 18,724 tokens
    assert _tiled(True, 1, shape) and not _tiled(False, 10**7, shape) and _tiled(100, 101, shape)
    from fastkern.capacity import DEFAULT_TILE_BYTES, ROW_MULTIPLE

    bound = -(-(DEFAULT_TILE_BYTES // (shape.intermediate * 2)) // ROW_MULTIPLE) * ROW_MULTIPLE
    assert all(tile_rows(t, shape.intermediate, 2) <= min(t, bound) for t in range(1, 200000, 997))


@pytest.mark.parametrize("size, qlora", [("8b", True), ("1b", False), ("qwen3-8b", True)])
@pytest.mark.parametrize("checkpointing", ["offload", "device", None])
def test_device_peak_monotone_and_longest_sequence_on_the_boundary(size, qlora, checkpointing):
    options = {"checkpointing": checkpointing, "tiled_mlp": True}  # always tiled: one monotone piece
    lengths = sorted({*range(1000, 2_000_000, 37_111), *(2**k + d for k in range(12, 21) for d in (-1, 0, 1))})
    peaks = [plan_memory(size, n, lora_rank=16, qlora=qlora, options=options, host_bytes=60 << 30).device_peak_bytes
             for n in lengths]
    assert peaks == sorted(peaks)
    for budget_gib in (24, 80, 139):
        plan = plan_memory(size, 4096, lora_rank=16, qlora=qlora, options=options, host_bytes=60 << 30,
                           device_bytes=budget_gib << 30)
        n = plan.max_seq_len
        assert n >= 1
        at = plan_memory(size, n, lora_rank=16, qlora=qlora, options=options, host_bytes=60 << 30,
                         device_bytes=budget_gib << 30)
        past = plan_memory(size, n + 1, lora_rank=16, qlora=qlora, options=options, host_bytes=60 << 30,
                           device_bytes=budget_gib << 30)
        assert at.fits and not past.fits and at.max_seq_len == n


def test_auto_tiling_drop_is_searched_on_both_sides():
    """Past the auto threshold the MLP stops holding [T, I] tensors: the prediction drops there, so a budget
    that a just-untiled length misses can still fit a longer, tiled one; the search finds the longer."""
    cut = 18724
    untiled = plan_memory("8b", cut, lora_rank=16, qlora=True)
    tiled = plan_memory("8b", cut + 1, lora_rank=16, qlora=True)
    assert not untiled.tiled_mlp and tiled.tiled_mlp and tiled.device_peak_bytes < untiled.device_peak_bytes
    budget = (untiled.device_peak_bytes + tiled.device_peak_bytes) // 2
    plan = plan_memory("8b", 1024, lora_rank=16, qlora=True, device_bytes=budget)
    assert plan.max_seq_len > cut
    assert plan_memory("8b", plan.max_seq_len, lora_rank=16, qlora=True).device_peak_bytes <= budget


def test_host_budget_overflows_checkpoints_to_the_device():
    t = 131072
    per_layer = t * 4096 * 2  # 1 GiB, a power of two: pinned size equals the tensor
    assert pinned_bytes(per_layer) == per_layer and pinned_bytes(per_layer + 1) == 2 * per_layer
    free = plan_memory("8b", t, lora_rank=16, qlora=True)
    capped = plan_memory("8b", t, lora_rank=16, qlora=True, host_bytes=10 * per_layer + per_layer // 2)
    assert (free.layers_on_host, free.host_peak_bytes) == (32, 32 * per_layer)
    assert (capped.layers_on_host, capped.layers_on_device, capped.host_peak_bytes) == (10, 22, 10 * per_layer)
    assert capped.device_peak_bytes - free.device_peak_bytes == 22 * per_layer
    # patch_model's dict form carries the same budget
    via_option = plan_memory("8b", t, lora_rank=16, qlora=True,
                             options={"checkpointing": {"offload": True, "host_bytes": 10 * per_layer}})
    assert via_option.layers_on_host == 10
    device = plan_memory("8b", t, lora_rank=16, qlora=True, options={"checkpointing": "device"})
    assert device.host_peak_bytes == 0 and device.device_peak_bytes - free.device_peak_bytes == 32 * per_layer


def test_min_bytes_keeps_short_checkpoints_on_the_device_and_the_search_sees_the_drop():
    """checkpointing={"offload": True, "min_bytes": N}: layer inputs below N stay on the device (as the
    offloader keeps them, and as the default recompute does), from N they go to the host; the prediction
    drops at that switch, so the search looks on both sides of it."""
    long_recipe = {"checkpointing": {"offload": True, "min_bytes": 256 << 20}}
    cut = (256 << 20) // (4096 * 2) - 1  # the last token count whose [T, 4096] bf16 input stays below 256 MiB
    short = plan_memory("8b", cut, lora_rank=16, qlora=True, options=long_recipe)
    device = plan_memory("8b", cut, lora_rank=16, qlora=True, options={"checkpointing": "recompute"})
    assert (short.layers_on_host, short.host_peak_bytes) == (0, 0)
    assert short.device_peak_bytes == device.device_peak_bytes
    offloaded = plan_memory("8b", cut + 1, lora_rank=16, qlora=True, options=long_recipe)
    assert offloaded.layers_on_host == 32 and offloaded.device_peak_bytes < short.device_peak_bytes
    assert offloaded.device_peak_bytes == plan_memory("8b", cut + 1, lora_rank=16, qlora=True).device_peak_bytes
    budget = (short.device_peak_bytes + offloaded.device_peak_bytes) // 2
    plan = plan_memory("8b", 1024, lora_rank=16, qlora=True, options=long_recipe, device_bytes=budget)
    assert plan.max_seq_len > cut
    at = plan_memory("8b", plan.max_seq_len, lora_rank=16, qlora=True, options=long_recipe)
    assert at.device_peak_bytes <= budget
    assert plan_memory("8b", plan.max_seq_len + 1, lora_rank=16, qlora=True,
                       options=long_recipe).device_peak_bytes > budget


def test_terms_are_explicit_and_sum_to_the_peak():
    plan = plan_memory("1b", 65536, lora_rank=8, device_bytes=80 << 30, host_bytes=100 << 30)
    assert sum(plan.terms.values()) == plan.device_peak_bytes
    assert plan.terms["weights"] == weight_bytes(Shape.of("1b"))
    assert plan.terms["LoRA params + grads + AdamW (fp32)"] == lora_params(Shape.of("1b"), 8) * 16
    text = str(plan)
    assert "not a measurement" in text and "longest sequence that fits" in text
    full = plan_memory("1b", 65536)  # lora_rank None: full fine-tune
    assert full.terms["grads + AdamW (full fine-tune)"] == weight_bytes(Shape.of("1b")) // 2 * 10
    assert fastkern.plan_memory is plan_memory and plan.fits and full.fits is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=0), "seq_len must be an int >= 1"),
    (dict(seq_len=1.5), "seq_len must be an int >= 1"),
    (dict(batch=0), "batch must be an int >= 1"),
    (dict(lora_rank=0), "lora_rank must be None or an int >= 1"),
    (dict(device_bytes=-1), "device_bytes must be None or an int >= 0"),
    (dict(host_bytes=2.5), "host_bytes must be None or an int >= 0"),
    (dict(qlora=True, lora_rank=None), "pass lora_rank"),
    (dict(options={"checkpointing": "cpu"}), "must be \"offload\", \"device\" or \"recompute\""),
    (dict(options={"checkpointing": {"offload": True, "host_bytes": -2}}), "host_bytes must be None or an int"),
    (dict(options={"tiled_mlp": "yes"}), "tiled_mlp"),
    (dict(options={"tiled": True}), "unknown options"),
    (dict(model="70b"), "unknown size '70b'"),
    (dict(model=object()), "lacks"),
])
def test_bad_arguments(kwargs, match):
    kwargs = {"model": "8b", "seq_len": 1024, "lora_rank": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan_memory(kwargs.pop("model"), kwargs.pop("seq_len"), **kwargs)


def test_cli_capacity(capsys):
    from fastkern.cli import main

    assert main(["capacity", "--size", "8b", "--qlora", "--device-gib", "80", "--host-gib", "120"]) == 0
    out = capsys.readouterr().out
    assert "device peak" in out and "longest sequence that fits" in out
    expected = plan_memory("8b", 131072, lora_rank=16, qlora=True, device_bytes=80 << 30, host_bytes=120 << 30)
    assert f"{expected.max_seq_len} tokens" in out
    with pytest.raises(SystemExit):
        main(["capacity", "--size", "8b", "--device-gib", "-1"])
    with pytest.raises(SystemExit):
        main(["capacity", "--size", "8b", "--qlora", "--full"])
    assert set(SIZES) == {"8b", "1b", "qwen3-8b"}


def test_unfused_loss_holds_the_logits_and_recompute_is_device():
    """options={"loss": False}: transformers' loss keeps [T, V] logits (bf16 + fp32 log-softmax and gradients,
    14 bytes per element at its peak); patch_model's "recompute" keeps checkpoints on the device."""
    fused = plan_memory("1b", 65536, lora_rank=16, options={"checkpointing": "device"})
    unfused = plan_memory("1b", 65536, lora_rank=16, options={"checkpointing": "device", "loss": False})
    vocab = 128256
    assert unfused.device_peak_bytes >= fused.device_peak_bytes + 65536 * vocab * 10
    assert unfused.terms["peak transient (max of loss, layer bwd)"] >= 65536 * vocab * 14
    recompute = plan_memory("1b", 65536, lora_rank=16, options={"checkpointing": "recompute"})
    assert recompute.device_peak_bytes == fused.device_peak_bytes
    limit = plan_memory("1b", 4096, lora_rank=16, options={"loss": False}, device_bytes=80 << 30).max_seq_len
    assert 0 < limit < plan_memory("1b", 4096, lora_rank=16, device_bytes=80 << 30).max_seq_len
    with pytest.raises(ValueError, match="loss"):
        plan_memory("1b", 4096, lora_rank=16, options={"loss": "yes"})
