"""patch_model(compile=True): regional compilation of the decoder layers of this instance only,
training as the uncompiled patched model does, removed by unpatch_model."""

import copy

import pytest
import torch

import fastkern
from tests.models import tiny_model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_layers_train_like_the_uncompiled_patched_model():
    base = tiny_model("llama").train()
    ids = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    eager = copy.deepcopy(base)
    fastkern.patch_model(eager)
    compiled = copy.deepcopy(base)
    report = fastkern.patch_model(compiled, compile=True)
    assert len(report.patched_names("compile")) == base.config.num_hidden_layers
    torch._dynamo.reset()
    loss0, grads0 = _step(eager, ids)
    loss1, grads1 = _step(compiled, ids)
    # Inductor may reorder fp32 reductions around the (opaque) fastkern ops: fp32 rounding, not more.
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-5, msg=name)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in base.modules())  # this instance only
    fastkern.unpatch_model(compiled)
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in compiled.modules())


def test_compile_option_rejects_other_values_and_is_off_by_default():
    assert not fastkern.patch_model(tiny_model("llama")).patched_names("compile")
    with pytest.raises(TypeError, match="compile must be True or False"):
        fastkern.patch_model(tiny_model("llama"), compile="max-autotune")
