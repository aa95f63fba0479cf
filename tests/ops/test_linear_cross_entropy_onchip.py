"""impl="onchip" of fused_linear_cross_entropy / fused_linear_logprobs: the Triton GEMM kernels with
logit tiles kept on chip (interpreter on CPU) against the float64 oracle.

Shapes are tiny (the interpreter runs tl.dot in NumPy) but never multiples of the interpreter's tiles
(16 rows, 64 vocabulary columns, 32 hidden): every tile kind has masked lanes.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastkern
from fastkern.ops import linear_cross_entropy_onchip as oc
from fastkern.reference.linear_cross_entropy import linear_cross_entropy_reference, linear_logprobs_reference
from tests.oracle import assert_compiled_matches_eager
from tests.ops.test_linear_cross_entropy import assert_close, make_hidden, make_labels, torch_eager
from tests.profiles import bounded

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
flce = fastkern.ops.fused_linear_cross_entropy
flp = fastkern.ops.fused_linear_logprobs


def torch_eager_logprobs(hidden, weight, targets, bias=None, temperature=1.0, softcap=None, logit_scale=1.0):
    """Logits in the input dtype, then fp32 math (the same-dtype baseline); p log p = 0 where p = 0."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z.float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, -1)
    p = logp.exp()
    return logp.gather(1, targets[:, None])[:, 0], -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


def tol(dtype):
    return torch.float32 if dtype == torch.float32 else dtype


def run_loss(n, h, v, dtype, *, reduction="mean", pattern="mixed", use_bias=False, softcap=None, logit_scale=1.0,
             label_smoothing=0.0, num_items=None, layout="contiguous", frozen=False, hidden_grad=True,
             device="cpu", scale=1.0, masked_vocab=0):
    hidden0 = make_hidden(n, h, dtype, layout, device) * scale
    weight0 = (torch.randn(v, h, device=device) / math.sqrt(h)).to(dtype)
    labels = make_labels(n, v - masked_vocab, pattern, device=device)
    bias0 = None
    if use_bias or masked_vocab:
        bias0 = torch.randn(v, device=device)
        # The last `masked_vocab` entries can never be predicted (labels stay below them).
        bias0[v - masked_vocab:] = float("-inf")
        bias0 = bias0.to(dtype)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, softcap=softcap, logit_scale=logit_scale,
              num_items_in_batch=num_items)

    def leaves(cast):
        return (cast(hidden0).requires_grad_(hidden_grad), cast(weight0).requires_grad_(not frozen),
                cast(bias0).requires_grad_() if bias0 is not None else None)

    hd, wd, bd = leaves(lambda t: t.detach().clone())
    out = flce(hd, wd, labels, bias=bd, impl="onchip", **kw)
    upstream = torch.randn(out.shape, device=device) if reduction == "none" else torch.tensor(1.7, device=device)
    if out.requires_grad:
        out.backward(upstream)
    h64, w64, b64 = leaves(lambda t: t.detach().double())
    ref = linear_cross_entropy_reference(h64, w64, labels, bias=b64, **kw)
    if ref.requires_grad:
        ref.backward(upstream.double())
    hs, ws, bs = leaves(lambda t: t.detach().clone())
    same = torch_eager(hs, ws, labels, bias=bs, logit_scale=logit_scale, softcap=softcap,
                       **{k: kw[k] for k in ("reduction", "label_smoothing", "num_items_in_batch")})
    if same.requires_grad:
        same.backward(upstream)

    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close(out, ref, tol(dtype), same, "loss")
    for name, mine, oracle, baseline, wanted in (("grad_hidden", hd, h64, hs, hidden_grad),
                                                 ("grad_weight", wd, w64, ws, not frozen),
                                                 ("grad_bias", bd, b64, bs, bias0 is not None)):
        if not wanted:
            assert mine is None or mine.grad is None, f"{name} computed though not required"
            continue
        assert mine.grad is not None and mine.grad.dtype == dtype, name
        assert torch.isfinite(mine.grad).all(), name
        assert_close(mine.grad, oracle.grad, dtype, baseline.grad, name)
    return out


def run_logprobs(n, h, v, dtype, *, use_bias=False, temperature=1.0, softcap=None, logit_scale=1.0, frozen=False,
                 grads=("logp", "entropy"), masked_vocab=0):
    hidden0 = torch.randn(n, h).to(dtype)
    weight0 = (torch.randn(v, h) / math.sqrt(h)).to(dtype)
    bias0 = None
    if use_bias or masked_vocab:
        bias0 = torch.randn(v)
        bias0[v - masked_vocab:] = float("-inf")
        bias0 = bias0.to(dtype)
    targets = torch.randint(0, v - masked_vocab, (n,))
    up_lp, up_ent = torch.randn(n), torch.randn(n)
    kw = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)

    def run(fn, cast):
        hd = cast(hidden0).requires_grad_()
        wd = cast(weight0).requires_grad_(not frozen)
        bd = cast(bias0).requires_grad_() if bias0 is not None else None
        lp, ent = fn(hd, wd, bd)
        obj = sum((lp * up_lp.to(lp.dtype)).sum() if g == "logp" else (ent * up_ent.to(ent.dtype)).sum()
                  for g in grads)
        obj.backward()
        return lp, ent, hd, wd, bd

    mine = run(lambda a, b, c: flp(a, b, targets, bias=c, return_entropy=True, impl="onchip", **kw),
               lambda t: t.detach().clone())
    oracle = run(lambda a, b, c: linear_logprobs_reference(a, b, targets, bias=c, **kw), lambda t: t.detach().double())
    same = run(lambda a, b, c: torch_eager_logprobs(a, b, targets, bias=c, **kw), lambda t: t.detach().clone())
    assert_close(mine[0], oracle[0], tol(dtype), same[0], "logprobs")
    assert_close(mine[1], oracle[1], tol(dtype), same[1], "entropy")
    for i, name, wanted in ((2, "grad_hidden", True), (3, "grad_weight", not frozen), (4, "grad_bias", bias0 is not None)):
        if not wanted:
            assert mine[i] is None or mine[i].grad is None, name
            continue
        assert mine[i].grad.dtype == dtype and torch.isfinite(mine[i].grad).all(), name
        assert_close(mine[i].grad, oracle[i].grad, dtype, same[i].grad, name)


@pytest.mark.usefixtures("poison_empty")
@bounded(20)
@given(
    n=st.sampled_from([1, 7, 33]),
    h=st.sampled_from([5, 40]),
    v=st.sampled_from([13, 131]),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    pattern=st.sampled_from(["none_ignored", "mixed", "all_ignored"]),
    use_bias=st.booleans(),
    softcap=st.sampled_from([None, 2.5]),
    logit_scale=st.sampled_from([1.0, 0.6]),
    label_smoothing=st.sampled_from([0.0, 0.15]),
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    frozen=st.booleans(),
)
def test_loss_matches_float64_oracle(n, h, v, dtype, reduction, pattern, use_bias, softcap, logit_scale,
                                     label_smoothing, layout, frozen):
    run_loss(n, h, v, dtype, reduction=reduction, pattern=pattern, use_bias=use_bias, softcap=softcap,
             logit_scale=logit_scale, label_smoothing=label_smoothing, layout=layout, frozen=frozen)


@pytest.mark.usefixtures("poison_empty")
@bounded(12)
@given(
    n=st.sampled_from([3, 20]),
    v=st.sampled_from([13, 131]),
    dtype=st.sampled_from(DTYPES),
    use_bias=st.booleans(),
    temperature=st.sampled_from([1.0, 0.7]),
    softcap=st.sampled_from([None, 3.0]),
    frozen=st.booleans(),
    grads=st.sampled_from([("logp",), ("entropy",), ("logp", "entropy")]),
)
def test_logprobs_and_entropy_match_float64_oracle(n, v, dtype, use_bias, temperature, softcap, frozen, grads):
    run_logprobs(n, 24, v, dtype, use_bias=use_bias, temperature=temperature, softcap=softcap, frozen=frozen,
                 grads=grads)


@pytest.mark.usefixtures("poison_empty")
def test_softcap_does_not_leak_into_padded_lanes():
    # V = 65: the second 64-wide tile has 1 real lane and 63 padded ones; tanh(0) = 0, so a padded
    # lane that escaped the mask would add exp(0) to the partition function.
    torch.manual_seed(1)
    run_loss(19, 8, 65, torch.float32, softcap=1.0, reduction="none", pattern="none_ignored")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_inf_bias_masks_vocabulary_without_nan(dtype):
    torch.manual_seed(2)
    run_loss(21, 8, 70, dtype, reduction="none", masked_vocab=9, pattern="mixed")
    run_loss(21, 8, 70, dtype, reduction="mean", masked_vocab=9, softcap=4.0)
    run_logprobs(9, 8, 70, dtype, masked_vocab=9)


def test_top1_and_mean_logits_for_trl():
    torch.manual_seed(3)
    from fastkern.ops.linear_logprobs import logprobs_entropy_top1

    hidden, weight = torch.randn(23, 8), torch.randn(70, 8)
    targets = torch.randint(0, 70, (23,))
    z = hidden @ weight.T
    targets[:5] = z[:5].argmax(1)  # some rows whose target is the argmax
    got = logprobs_entropy_top1(hidden, weight, targets, return_entropy=True, impl="onchip")
    want = logprobs_entropy_top1(hidden, weight, targets, return_entropy=True, impl="chunked")
    assert torch.equal(got[2], want[2]) and got[2][:5].all()
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_vocabulary_splits_combine_to_the_same_statistics(splits):
    # 7 splits over 2 tiles: five splits own no tile and must write the empty-set partials.
    torch.manual_seed(4)
    hidden, weight, bias = torch.randn(18, 8), torch.randn(100, 8), torch.randn(100)
    targets = torch.randint(-1, 100, (18,))
    kw = dict(logit_scale=0.8, softcap=3.0, u_scale=1.2, has_entropy=True, has_top1=True)
    got = oc.onchip_stats(hidden, weight, bias, targets, splits=splits, **kw)
    z = (hidden.double() @ weight.double().T + bias.double()) * 0.8
    u = 3.0 * torch.tanh(z / 3.0) * 1.2
    lse = torch.logsumexp(u, 1)
    p = torch.softmax(u, 1)
    has = targets >= 0
    torch.testing.assert_close(got["lse"].double(), lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["sum_plogp"].double(), (p * (u - lse[:, None])).sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["sum_u"].double(), u.sum(1), rtol=1e-5, atol=1e-5)
    tu = torch.where(has, u.gather(1, targets.clamp(min=0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(got["target_u"].double(), tu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["max_u"].double(), u.max(1).values, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("poison_empty")
def test_bounded_accumulators_chunk_rows_and_vocabulary(monkeypatch):
    # Accumulators of one hidden row: dW runs one vocabulary row per launch, dH (frozen) one token.
    torch.manual_seed(5)
    monkeypatch.setattr(oc, "DW_ACCUMULATOR_BYTES", 40 * 4 * 7)
    monkeypatch.setattr(oc, "DH_ACCUMULATOR_BYTES", 40 * 4 * 5)
    run_loss(17, 40, 23, torch.bfloat16, use_bias=True)
    run_loss(17, 40, 23, torch.bfloat16, frozen=True, reduction="none")


def test_frozen_weight_does_no_weight_gradient_work(monkeypatch):
    seen = []
    real = oc.onchip_grads

    def spy(*args, **kw):
        seen.append((kw["need_gh"], kw["need_gw"], kw["need_gb"]))
        return real(*args, **kw)

    monkeypatch.setattr(oc, "onchip_grads", spy)
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    flce(hidden, weight, make_labels(9, 20, "mixed"), impl="onchip").backward()
    assert seen == [(True, False, False)] and hidden.grad is not None
    with torch.no_grad():
        flce(hidden, weight, make_labels(9, 20, "mixed"), impl="onchip")
    assert len(seen) == 1  # inference: statistics only


def test_num_items_in_batch_and_all_ignored():
    torch.manual_seed(6)
    run_loss(9, 6, 23, torch.float32, num_items=torch.tensor(5), use_bias=True)
    run_loss(9, 6, 23, torch.float32, reduction="sum", num_items=7)
    hidden = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    loss = flce(hidden, weight, torch.full((5,), -100), impl="onchip")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_impl_argument(monkeypatch):
    h, w, y = torch.randn(3, 4), torch.randn(9, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="`impl`"):
        flce(h, w, y, impl="fast")
    with pytest.raises(ValueError, match="`impl`"):
        flp(h, w, y, impl="fast")
    calls = []
    monkeypatch.setattr(oc, "onchip_stats", lambda *a, **k: calls.append(1))
    flce(h, w, y)  # "auto" stays on the chunked path until the GPU measurements decide
    flce(h, w, y, impl="chunked")
    flce(h.double(), w.double(), y, impl="onchip")  # float64: the chunked reference path
    assert calls == []
    with pytest.raises(ValueError, match=r"`labels` has 1 value"):
        flce(h, w, torch.tensor([0, 9, 1]), impl="onchip")


def test_torch_compile_fullgraph():
    hidden = torch.randn(7, 5, requires_grad=True)
    weight = torch.randn(13, 5, requires_grad=True)
    labels = make_labels(7, 13, "mixed")

    def f(h, w):
        lp, ent = flp(h, w, labels.clamp(min=0), return_entropy=True, impl="onchip")
        return flce(h, w, labels, softcap=2.0, impl="onchip") * 2 + lp.sum() + ent.sum()

    assert_compiled_matches_eager(f, hidden, weight)


def test_custom_ops_are_registered():
    h, w, y = torch.randn(3, 4), torch.randn(9, 4), torch.tensor([0, 8, -1])
    torch.library.opcheck(oc.lce_onchip_stats_op, (h, w, None, y, -1, 1.0, 2.0, 1.0, True, True, "t"))
    lse = torch.rand(3) + 3
    coefs = [torch.rand(3), torch.rand(3), torch.rand(3)]
    torch.library.opcheck(oc.lce_onchip_grads_op, (h, w, None, y, -1, lse, None, coefs, 1.0, None, 1.0, True, True,
                                                   False, "t"))


# GPU: real sizes, against an fp64 oracle computed 2048 rows at a time (independent of fastkern).

def _fp64_oracle(hidden, weight, labels, softcap=None, rows=2048):
    h64, w64 = hidden.detach().double(), weight.detach().double()
    valid = labels != -100
    count = valid.sum().clamp(min=1)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    gh, gw = torch.empty_like(h64), torch.zeros_like(w64)
    for s in range(0, hidden.shape[0], rows):
        z = h64[s:s + rows] @ w64.T
        t = torch.tanh(z / softcap) if softcap else None
        u = softcap * t if softcap else z
        y, ok = labels[s:s + rows], valid[s:s + rows]
        total += torch.nn.functional.cross_entropy(u, y, reduction="sum")
        du = torch.softmax(u, -1)
        du[ok, y[ok]] -= 1
        du[~ok] = 0
        du /= count
        if softcap:
            du *= 1 - t * t
        gh[s:s + rows] = du @ w64
        gw += du.T @ h64[s:s + rows]
        del z, u, du, t
    return total / count, gh, gw


@pytest.mark.gpu
@pytest.mark.parametrize("frozen", [False, True])
def test_gpu_llama3_head(frozen):
    torch.manual_seed(0)
    n, h, v = 8192, 4096, 128256
    hidden = (torch.randn(n, h, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda") / 64).to(torch.bfloat16).requires_grad_(not frozen)
    labels = make_labels(n, v, "mixed", device="cuda")
    loss = flce(hidden, weight, labels, impl="onchip")
    loss.backward()
    ref_loss, gh, gw = _fp64_oracle(hidden, weight, labels)
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    assert_close(hidden.grad, gh, torch.bfloat16, name="grad_hidden")
    if not frozen:
        assert_close(weight.grad, gw, torch.bfloat16, name="grad_weight")


@pytest.mark.gpu
def test_gpu_logits_past_2_31_elements():
    # N x V = 32768 x 151936 = 4.98e9 logits (Qwen's vocabulary), memory-light: H = 128.
    torch.manual_seed(0)
    n, h, v = 32768, 128, 151936
    hidden = torch.randn(n, h, device="cuda").to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, device="cuda") / 8).to(torch.bfloat16).requires_grad_()
    labels = make_labels(n, v, "mixed", device="cuda")
    loss = flce(hidden, weight, labels, softcap=30.0, impl="onchip")
    loss.backward()
    ref_loss, gh, gw = _fp64_oracle(hidden, weight, labels, softcap=30.0)
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * abs(ref_loss.item())
    assert_close(hidden.grad, gh, torch.bfloat16, name="grad_hidden")
    assert_close(weight.grad, gw, torch.bfloat16, name="grad_weight")


@pytest.mark.gpu
@bounded(6)
@given(n=st.integers(1, 3000), v=st.integers(65537, 70000), dtype=st.sampled_from(DTYPES),
       reduction=st.sampled_from(["mean", "none"]), softcap=st.sampled_from([None, 10.0]))
def test_gpu_odd_shapes(n, v, dtype, reduction, softcap):
    run_loss(n, 96, v, dtype, reduction=reduction, softcap=softcap, device="cuda", use_bias=True,
             label_smoothing=0.1)
