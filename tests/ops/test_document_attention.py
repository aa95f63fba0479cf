"""fastkern.ops.document_attention: each document alone through causal attention, vs a float64 oracle."""

import pytest
import torch

from fastkern.ops.document_attention import document_attention, select_backend, varlen_unavailable_reason
from fastkern.reference.document_attention import document_attention_reference


def inputs(lengths, hq=4, hk=2, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, generator=g).to(dtype) for h in (hq, hk, hk))
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return q, k, v, bounds


def one_document_at_a_time(q, k, v, bounds, scale=None, window=None, softcap=None):
    """Float64 oracle: dense causal attention of each document alone, written independently of the op."""
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (t[s:e].double().transpose(0, 1) for t in (q, k, v))
        group = qd.shape[0] // kd.shape[0]
        kd, vd = kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0)
        scores = qd @ kd.transpose(1, 2) * (scale if scale is not None else qd.shape[-1] ** -0.5)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i, j = torch.arange(e - s)[:, None], torch.arange(e - s)[None, :]
        keep = (j <= i) & ((i - j < window) if window is not None else True)
        scores = scores.masked_fill(~keep, float("-inf"))
        outs.append((scores.softmax(-1) @ vd).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "auto"])
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 1, 3])
def test_matches_documents_alone(backend, hq, hk, window):
    lengths = [5, 1, 9, 3, 1, 6]
    q, k, v, bounds = inputs(lengths, hq, hk)
    want = one_document_at_a_time(q, k, v, bounds, scale=0.3, window=window)
    got = document_attention(q, k, v, torch.tensor(bounds, dtype=torch.int32), scale=0.3, sliding_window=window,
                             backend=backend)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


def test_softcap_gradients_and_bf16():
    lengths = [4, 7, 1]
    q, k, v, bounds = inputs(lengths, 4, 2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = document_attention(*leaves, bounds, softcap=2.0, sliding_window=5)
    ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
    want = one_document_at_a_time(*ref_leaves, bounds, softcap=2.0, window=5)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)
    dout = torch.randn_like(got)
    grads = torch.autograd.grad(got, leaves, dout)
    want_grads = torch.autograd.grad(want, ref_leaves, dout.double())
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)
    # bf16 per-document SDPA stays within what bf16 attention gives on the whole batch.
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    got16 = document_attention(qb, kb, vb, bounds)
    want64 = one_document_at_a_time(q, k, v, bounds)
    assert ((got16.double() - want64).norm() / want64.norm()) < 1e-2


def test_reference_matches_oracle_and_dropout_is_training_only():
    q, k, v, bounds = inputs([3, 8])
    want = one_document_at_a_time(q, k, v, bounds)
    torch.testing.assert_close(document_attention_reference(q.double(), k.double(), v.double(), bounds), want)
    torch.manual_seed(0)
    dropped = document_attention(q, k, v, bounds, dropout_p=0.5, backend="eager")
    assert not torch.allclose(dropped.double(), want, atol=1e-3)


def test_backend_selection_on_cpu():
    q, k, v, bounds = inputs([2, 3])
    assert select_backend(q, k, bounds=bounds) == "sdpa"
    assert select_backend(q, k, bounds=bounds, softcap=1.0) == "eager"
    # CPU tensors (or a torch without varlen_attn): never the varlen backend, and it says why.
    assert varlen_unavailable_reason(q, k, scale=0.25, sliding_window=None, softcap=None, dropout_p=0.0,
                                     max_seqlen=3) is not None
    with pytest.raises(ValueError, match="backend='varlen' cannot run here"):
        document_attention(q, k, v, bounds, backend="varlen")
    with pytest.raises(ValueError, match="cannot apply a logit softcap"):
        document_attention(q, k, v, bounds, softcap=1.0, backend="sdpa")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(cu=[0, 2, 4]), "from 0 to the token count 5"),
        (dict(cu=[0, 4, 2, 5]), "non-decreasing"),
        (dict(k_heads=3), "multiple of key/value heads"),
        (dict(window=0), "sliding_window must be a positive int"),
        (dict(softcap=-1.0), "softcap must be positive"),
        (dict(dropout=1.0), "dropout_p must be in"),
        (dict(backend="flash"), "backend must be one of"),
        (dict(flat=True), r"must be \[tokens, heads, head_dim\]"),
        (dict(cu=torch.tensor([0.0, 5.0])), "1-D integer tensor"),
    ],
)
def test_bad_input_clear_errors(change, match):
    q, k, v, _ = inputs([2, 3])
    if "k_heads" in change:
        k = v = torch.randn(5, change["k_heads"], 16)
    if change.get("flat"):
        q = q.flatten(1)
    with pytest.raises((ValueError, TypeError), match=match):
        document_attention(q, k, v, change.get("cu", [0, 2, 5]), sliding_window=change.get("window"),
                           softcap=change.get("softcap"), dropout_p=change.get("dropout", 0.0),
                           backend=change.get("backend", "auto"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("head_major", [False, True])
def test_gpu_varlen_matches_sdpa_per_document(window, head_major):
    lengths = [1, 300, 17, 1024, 5, 700]
    q, k, v, bounds = inputs(lengths, 32, 8, 64, torch.bfloat16)
    q, k, v = (t.cuda().requires_grad_() for t in (q, k, v))
    if head_major:  # the layout transformers' rope returns: [H, T, D] storage seen as [T, H, D]
        q, k = (t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for t in (q, k))
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    reason = varlen_unavailable_reason(q, k, scale=0.125, sliding_window=window, softcap=None, dropout_p=0.0,
                                       max_seqlen=1024)
    if reason is not None:
        pytest.skip(reason)
    got = document_attention(q, k, v, cu, sliding_window=window, backend="varlen")
    want = document_attention(q, k, v, cu, sliding_window=window, backend="sdpa")
    oracle = one_document_at_a_time(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), bounds, window=window)
    err = lambda x: ((x.detach().double().cpu() - oracle).norm() / oracle.norm()).item()  # noqa: E731
    assert err(got) <= 2 * err(want) + 2e-3
    dout = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        assert ((g.double() - w.double()).norm() / w.double().norm()) < 2e-2


def test_auto_backend_takes_varlen_only_for_token_major_contiguous_qk(monkeypatch):
    """Head-major q/k (transformers' rope output) go per document until varlen is verified on them."""
    import importlib

    da = importlib.import_module("fastkern.ops.document_attention")  # the module, not the re-exported function

    monkeypatch.setattr(da, "varlen_unavailable_reason", lambda *a, **k: None)  # pretend CUDA + varlen
    q, k, _, bounds = inputs([3, 4], 4, 2, 8, torch.float32)
    assert da.select_backend(q, k, bounds=bounds) == "varlen"
    q_hm, k_hm = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k))
    assert da.select_backend(q_hm, k, bounds=bounds) == "sdpa"
    assert da.select_backend(q, k_hm, bounds=bounds) == "sdpa"
    assert da.select_backend(q_hm, k_hm, bounds=bounds, softcap=5.0) == "eager"
