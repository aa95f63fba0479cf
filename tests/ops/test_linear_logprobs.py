"""fused_linear_logprobs (+ entropy): Triton row kernel (interpreter on CPU) and reference vs float64."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastkern
from fastkern import runtime
from fastkern.reference.linear_cross_entropy import linear_logprobs_reference
from tests.oracle import assert_close as oracle_assert_close
from tests.oracle import assert_compiled_matches_eager
from tests.profiles import bounded

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
flp = fastkern.ops.fused_linear_logprobs

def assert_close(actual, oracle, dtype, same=None, name="out", relative_only=False, rounding=None):
    """The shared oracle, except for bf16/fp16 tensors of a few elements, where one rounding flip is
    a large relative error (the 2x-PyTorch rule is ill-conditioned): there, per element, at most twice
    PyTorch's own error or 2 ulps of the element, plus one ulp of the largest element (sums such as
    grad_bias cancel: a rounding flip in one term is an ulp of the terms, not of the result).

    rounding: a componentwise bound on the rounding error of any implementation in `dtype` (see
    rounding_bounds); the result also passes when its error is within twice that bound (per element
    for small tensors, in norm otherwise)."""
    limit = None if rounding is None else 2 * rounding.double().cpu()
    if dtype in (torch.bfloat16, torch.float16) and actual.numel() < 16:
        o = oracle.detach().double().cpu()
        ulp = torch.finfo(dtype).eps * o.abs()
        err = (actual.detach().double().cpu() - o).abs()
        torch_err = (same.detach().double().cpu() - o).abs() if same is not None else torch.zeros_like(o)
        ok = err <= torch.maximum(2 * torch_err, 2 * ulp) + torch.finfo(dtype).eps * o.abs().max() + 1e-4
        if limit is not None:
            ok |= err <= limit
        assert torch.isfinite(actual).all() and ok.all(), f"{name}: {actual} vs {oracle} (torch: {same}, " \
            f"rounding bound: {limit})"
        return
    if limit is not None:
        err = (actual.detach().double().cpu() - oracle.detach().double().cpu()).norm()
        if err <= limit.norm():  # NaN fails here and is reported below
            return
    try:
        oracle_assert_close(actual, oracle, dtype, same, name, model_level=relative_only)
    except AssertionError as e:
        if limit is None:
            raise
        rel = (limit.norm() / oracle.detach().double().cpu().norm()).item()
        raise AssertionError(f"{e}, and > twice the rounding bound {rel:.3e}") from None


def rounding_bounds(hidden, weight, bias, targets, objective, dtype, **kw):
    """Componentwise first-order bounds on the rounding error of (grad_hidden, grad_weight, grad_bias)
    for an implementation that stores the logits z = hidden @ weight.T + bias rounded once to `dtype`
    (fastkern: one addmm) and dz = d(objective)/dz in `dtype`, then forms the gradients as products of
    dz with weight / hidden accumulated in fp32 and rounded once. Rounding dz costs eps/2 * |dz| per
    term and the final rounding eps/2 * |result| <= eps/2 * (|dz| @ |weight|): eps * |dz| carried
    through the products in absolute value. Rounding z moves dz by dz(z rounded) - dz(z) (float64),
    carried the same way. Where the products cancel (d(entropy)/dz = -p (log p + H) has both signs)
    these bounds are far above eps * |result|, which is why the rule needs them."""
    h, w = hidden.double(), weight.double()
    z = h @ w.T + (bias.double() if bias is not None else 0.0)

    def dz_at(logits, temperature, softcap, logit_scale):
        # linear_logprobs_reference's math from the logits on (a leaf here)
        logits = logits.detach().requires_grad_()
        u = logits * logit_scale
        if softcap is not None:
            u = softcap * torch.tanh(u / softcap)
        logp = torch.log_softmax(u / temperature, -1)
        p = logp.exp()
        objective(logp.gather(1, targets[:, None])[:, 0], -(p * torch.where(p > 0, logp, 0.0)).sum(-1)).backward()
        return logits.grad

    dz = dz_at(z, **kw)
    terms = torch.finfo(dtype).eps * dz.abs() + (dz_at(z.to(dtype).double(), **kw) - dz).abs()
    return terms @ w.abs(), terms.T @ h.abs(), terms.sum(0)


def torch_eager(hidden, weight, targets, bias=None, temperature=1.0, softcap=None, logit_scale=1.0):
    """Logits in the input dtype, then fp32 math (the same-dtype baseline)."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z.float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, -1)
    return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def run_case(n, h, v, dtype, *, use_bias=False, temperature=1.0, softcap=None, logit_scale=1.0, chunk_size=None,
             frozen=False, grads=("logp", "entropy"), device="cpu", scale=1.0):
    hidden0 = (torch.randn(n, h, device=device) * scale).to(dtype)
    weight0 = (torch.randn(v, h, device=device) / math.sqrt(h)).to(dtype)
    bias0 = torch.randn(v, device=device).to(dtype) if use_bias else None
    targets = torch.randint(0, v, (n,), device=device)
    up_lp, up_ent = torch.randn(n, device=device), torch.randn(n, device=device)
    kw = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)

    def objective(lp, ent):
        return sum((lp * up_lp.to(lp.dtype)).sum() if g == "logp" else (ent * up_ent.to(ent.dtype)).sum()
                   for g in grads)

    def run(fn, cast):
        hd = cast(hidden0).requires_grad_()
        wd = cast(weight0).requires_grad_(not frozen)
        bd = cast(bias0).requires_grad_() if use_bias else None
        lp, ent = fn(hd, wd, bd)
        objective(lp, ent).backward()
        return lp, ent, hd, wd, bd

    mine = run(lambda a, b, c: flp(a, b, targets, bias=c, return_entropy=True, chunk_size=chunk_size, **kw),
               lambda t: t.detach().clone())
    oracle = run(lambda a, b, c: linear_logprobs_reference(a, b, targets, bias=c, **kw), lambda t: t.detach().double())
    same = run(lambda a, b, c: torch_eager(a, b, targets, bias=c, **kw), lambda t: t.detach().clone())
    tol_dtype = torch.float32 if dtype == torch.float32 else dtype
    assert mine[0].dtype == torch.float32 and mine[1].dtype == torch.float32
    assert_close(mine[0], oracle[0], tol_dtype, same[0], "logprobs")
    assert_close(mine[1], oracle[1], tol_dtype, same[1], "entropy")
    # d(entropy)/dz = -p (log p + H) cancels where log p ~ -H, so with 16-bit logits PyTorch's own
    # error can reach the dtype bound (seen in CI: torch ~5e-3, fastkern 1.05e-2 on grad_bias, bf16,
    # n=1), and a fixed 2x-PyTorch ratio is a coin flip when both errors are a few roundings of a sum
    # of a few cancelling terms (seen: torch 4.2e-3, fastkern 1.1e-2 on grad_hidden, bf16, 3x7, v=5).
    # There a gradient passes under the relative rule (2x PyTorch's error plus the floor) or under
    # twice rounding_bounds: that bound is first order, the 2 covers the second-order terms and the fp32
    # rounding inside dz (fastkern reaches ~0.8x of the bound itself). PyTorch's eager path rounds the
    # logits twice (product, then + bias) and can exceed it: the relative rule covers that much error.
    ill_conditioned = "entropy" in grads and dtype != torch.float32
    rounding = rounding_bounds(hidden0, weight0, bias0, targets, objective, dtype, **kw) if ill_conditioned \
        else (None, None, None)
    for i, name, wanted in ((2, "grad_hidden", True), (3, "grad_weight", not frozen), (4, "grad_bias", use_bias)):
        if not wanted:
            assert mine[i] is None or mine[i].grad is None, name
            continue
        assert mine[i].grad.dtype == dtype
        assert_close(mine[i].grad, oracle[i].grad, dtype, same[i].grad, name, relative_only=ill_conditioned,
                     rounding=rounding[i - 2])


@pytest.mark.usefixtures("poison_empty")
@bounded(8)
@given(
    n=st.sampled_from([1, 3, 17]),
    h=st.sampled_from([1, 7]),
    v=st.sampled_from([1, 5, 97, 1030]),
    dtype=st.sampled_from(DTYPES),
    use_bias=st.booleans(),
    temperature=st.sampled_from([1.0, 0.7]),
    softcap=st.sampled_from([None, 3.0]),
    logit_scale=st.sampled_from([1.0, 1.3]),
    chunk_size=st.sampled_from([None, 2]),
    frozen=st.booleans(),
    grads=st.sampled_from([("logp",), ("entropy",), ("logp", "entropy")]),
)
def test_matches_float64_oracle(n, h, v, dtype, use_bias, temperature, softcap, logit_scale, chunk_size, frozen,
                                grads):
    run_case(n, h, v, dtype, use_bias=use_bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
             chunk_size=chunk_size, frozen=frozen, grads=grads)


def test_without_entropy_returns_one_tensor():
    h, w, t = torch.randn(4, 6, requires_grad=True), torch.randn(9, 6), torch.tensor([0, 8, 3, 3])
    lp = flp(h, w, t)
    assert isinstance(lp, torch.Tensor) and lp.shape == (4,)
    torch.testing.assert_close(lp, torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0])
    lp.sum().backward()
    assert h.grad is not None


def test_entropy_alone_is_differentiable():
    run_case(5, 4, 11, torch.float32, grads=("entropy",), softcap=2.0)


@pytest.mark.parametrize("bad", [9, -1, -100])
def test_targets_out_of_range_raise(bad):
    with pytest.raises(ValueError, match=r"`targets` has 1 value\(s\) outside \[0, 9\)"):
        flp(torch.randn(3, 4), torch.randn(9, 4), torch.tensor([0, bad, 3]))


def test_bad_temperature():
    with pytest.raises(ValueError, match="`temperature`"):
        flp(torch.randn(3, 4), torch.randn(9, 4), torch.tensor([0, 1, 3]), temperature=0.0)


def test_reference_path_matches_the_kernel_path():
    h, w, t = torch.randn(6, 5), torch.randn(40, 5), torch.randint(0, 40, (6,))
    kernel = flp(h, w, t, return_entropy=True, softcap=2.0, temperature=0.9, chunk_size=4)
    with runtime.force_reference():
        reference = flp(h, w, t, return_entropy=True, softcap=2.0, temperature=0.9, chunk_size=4)
    torch.testing.assert_close(kernel, reference)


def test_torch_compile_fullgraph():
    h, w = torch.randn(5, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    t = torch.randint(0, 9, (5,))

    def f(h, w):
        lp, ent = flp(h, w, t, return_entropy=True, temperature=0.8)
        return (lp * 2 + ent).sum()

    assert_compiled_matches_eager(f, h, w)


def test_float64_gradcheck():
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, 2])
    assert torch.autograd.gradcheck(lambda h, w: flp(h, w, t, return_entropy=True, softcap=1.5, chunk_size=2), (h, w))


@pytest.mark.gpu
@pytest.mark.parametrize("frozen", [False, True])
def test_gpu_real_size(frozen):
    run_case(2048, 2048, 151936, torch.bfloat16, frozen=frozen, temperature=0.9, device="cuda")


@pytest.mark.gpu
@bounded(4)
@given(n=st.integers(1, 2000), v=st.integers(65537, 70000), softcap=st.sampled_from([None, 30.0]))
def test_gpu_vocab_above_65536(n, v, softcap):
    run_case(n, 64, v, torch.bfloat16, softcap=softcap, device="cuda", use_bias=True)


@pytest.mark.usefixtures("poison_empty")
def test_expanded_upstream_gradients():
    # .sum() hands backward stride-0 gradients; the kernel must not read them as contiguous vectors.
    h, w = torch.randn(6, 5, requires_grad=True), torch.randn(13, 5, requires_grad=True)
    t = torch.randint(0, 13, (6,))
    lp, ent = flp(h, w, t, return_entropy=True, chunk_size=4)
    (lp.sum() + ent.sum()).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    lp64, ent64 = linear_logprobs_reference(h64, w64, t)
    (lp64.sum() + ent64.sum()).backward()
    oracle_assert_close(h.grad, h64.grad, torch.float32, name="grad_hidden")
    oracle_assert_close(w.grad, w64.grad, torch.float32, name="grad_weight")


@pytest.mark.parametrize("trainable", [True, False])
def test_forward_chunk_follows_the_weight_gradient_of_the_backward(monkeypatch, trainable):
    """The stats-only forward takes the large (weight-gradient) chunks when its backward will compute
    d(weight), and the small frozen-head chunks otherwise (inference, reference passes, LoRA heads)."""
    import sys

    lce = sys.modules["fastkern.ops.linear_cross_entropy"]
    seen = []
    real = lce.chunk_rows

    def recording(*args, weight_grad=True):
        seen.append(weight_grad)
        return real(*args, weight_grad=weight_grad)

    monkeypatch.setattr(lce, "chunk_rows", recording)
    hidden = torch.randn(6, 5, requires_grad=True)
    weight = torch.randn(11, 5, requires_grad=trainable)
    targets = torch.randint(0, 11, (6,))
    logp, entropy = fastkern.ops.fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert seen == [trainable]  # forward: stats only
    (logp.sum() + entropy.sum()).backward()
    assert seen == [trainable, trainable]  # backward: gradients, d(weight) iff trainable
    with torch.no_grad():
        fastkern.ops.fused_linear_logprobs(hidden, weight, targets)
    assert seen[-1] is False  # no backward at all


@pytest.mark.parametrize("impl", ["chunked", "onchip"])
@pytest.mark.parametrize("block", [False, True])
def test_entropy_of_confident_rows_keeps_fp32_accuracy(impl, block):
    """A near one-hot row (entropy ~0.01 beside logits ~10): entropy computed as lse - sum_j p_j u_j cancels
    and loses ~10 bits in fp32; fastkern sums p log p centred at lse. ``block``: the row's maximum comes
    late, in a later block of the online pass, so the centred sum is re-centred on the way."""
    g = torch.Generator().manual_seed(5)
    n, h, v = 6, 8, 300
    # logits: the peak class at ~12, the others at ~N(0, 0.6^2): entropy ~0.02
    hidden = torch.randn(n, h, generator=g) * 0.1
    hidden[:, 0] = 12.0
    weight = torch.randn(v, h, generator=g) * 0.1
    weight[:, 0] = torch.randn(v, generator=g) * 0.05
    peak = v - 1 if block else 3
    weight[peak, 0] = 1.0
    targets = torch.randint(0, v, (n,), generator=g)
    lp, ent = flp(hidden, weight, targets, return_entropy=True, impl=impl)
    ref = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    want = -(ref.exp() * ref).sum(-1)
    assert want.max() < 0.05  # confident: the regime where the uncentred form cancels
    same = -(torch.log_softmax(hidden @ weight.T, -1).exp() * torch.log_softmax(hidden @ weight.T, -1)).sum(-1)
    err, torch_err = ((ent.double() - want).norm() / want.norm()).item(), ((same.double() - want).norm() / want.norm()).item()
    assert err <= max(2 * torch_err, 1e-5), (err, torch_err)
    torch.testing.assert_close(lp.double(), ref.gather(1, targets[:, None])[:, 0], rtol=1e-5, atol=1e-5)
