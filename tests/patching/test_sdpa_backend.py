"""The SDPA backend a patched attention call prefers (fastkern/patching/sdpa_backend.py).

CPU: which calls ask for the cuDNN-first order (unmasked, unpacked "sdpa" calls only) and that the context
is a no-op wherever it must be. GPU (Hopper): the cuDNN-first run against the float64 reference rule.
"""

import contextlib

import pytest
import torch

import fastkern
from fastkern.patching import sdpa_backend
from tests.models import tiny_model


class RecordingPreference:
    """Records the implementation string every patched attention call hands to preferred_backends."""

    def __init__(self, monkeypatch):
        self.seen = []
        real = sdpa_backend.preferred_backends

        def recording(q, implementation):
            self.seen.append(implementation)
            return real(q, implementation)

        monkeypatch.setattr(sdpa_backend, "preferred_backends", recording)


def test_switch_off_cpu_tensors_and_other_implementations_get_no_context(monkeypatch):
    q = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    monkeypatch.setattr(sdpa_backend, "PREFER_CUDNN", False)
    assert isinstance(sdpa_backend.preferred_backends(q, "sdpa"), contextlib.nullcontext)
    monkeypatch.setattr(sdpa_backend, "PREFER_CUDNN", True)
    assert isinstance(sdpa_backend.preferred_backends(q, "sdpa"), contextlib.nullcontext)  # not CUDA
    assert isinstance(sdpa_backend.preferred_backends(q, "eager"), contextlib.nullcontext)
    assert isinstance(sdpa_backend.preferred_backends(q, ""), contextlib.nullcontext)


def test_unmasked_calls_ask_for_the_preference_masked_and_packed_calls_do_not(monkeypatch):
    recorder = RecordingPreference(monkeypatch)
    model = tiny_model("llama")
    fastkern.patch_model(model, mlp=False, loss=False, norm=False, rope=True)
    recorder.seen.clear()  # the patch-time probe's call
    ids = torch.randint(3, 131, (2, 9))
    with torch.no_grad():
        model(input_ids=ids)
    assert recorder.seen == ["sdpa", "sdpa"]  # two layers, no mask: the sdpa order may apply
    recorder.seen.clear()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: transformers builds a mask, cuDNN-first is not asked for
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert recorder.seen == ["", ""]
    recorder.seen.clear()
    position_ids = torch.cat([torch.arange(4), torch.arange(5)])[None]
    with torch.no_grad():
        model(input_ids=ids[:1], position_ids=position_ids)  # packed documents: fastkern's own attention
    assert recorder.seen == ["", ""]


def test_preference_changes_nothing_on_cpu(monkeypatch):
    ids = torch.randint(3, 131, (2, 9))
    losses = []
    for prefer in (False, True):
        monkeypatch.setattr(sdpa_backend, "PREFER_CUDNN", prefer)
        model = tiny_model("llama")
        fastkern.patch_model(model, mlp=False, loss=False, norm=False, rope=True)
        losses.append(model(input_ids=ids, labels=ids).loss.detach())
    assert torch.equal(losses[0], losses[1]) and torch.isfinite(losses[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the cuDNN-first order applies on Hopper GPUs only")
def test_cudnn_first_training_within_the_reference_rule(monkeypatch):
    """bf16 SGD steps with cuDNN first vs torch's own order (FlashAttention first), both against float64
    (math backend): the cuDNN run deviates no more than the rule allows, and cuDNN is what ran."""
    from tests.oracle import assert_within_reference_rule, train_for_reference_rule

    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    g = torch.Generator().manual_seed(5)
    batches = [(ids.cuda(), ids.cuda()) for ids in (torch.randint(3, 131, (2, 512), generator=g) for _ in range(3))]
    chosen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spying(q, k, v, *args, **kwargs):
        chosen.append(torch._fused_sdp_choice(q, k, v, *args, **kwargs))
        return real(q, k, v, *args, **kwargs)

    runs = {}
    for label, dtype, prefer in (("reference", torch.float64, False), ("unpatched", torch.bfloat16, False),
                                 ("patched", torch.bfloat16, True)):
        monkeypatch.setattr(sdpa_backend, "PREFER_CUDNN", prefer)
        model = tiny_model("llama", dtype=dtype, **shape).cuda()
        fastkern.patch_model(model, mlp=False, loss=False, norm=False, rope=True)
        chosen.clear()
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spying)
        runs[label] = train_for_reference_rule(model, batches)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real)
        if label == "patched":
            assert chosen and all(c == int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION) for c in chosen), chosen
    assert_within_reference_rule(runs["patched"], runs["unpatched"], runs["reference"], torch.bfloat16)
