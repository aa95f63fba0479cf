"""fastkern.ops.rope_qk_norm (q_norm/k_norm then rope, fused) against a float64 oracle and transformers.

The oracle is written here, independently of fastkern/reference: RMSNorm over head_dim in float64,
times (weight + offset), then x * cos + rotate(x) * sin on the leading rotary_dim elements. In float64
the llama and gemma forms are the same function (their difference is where bf16/fp16 rounds). q and k
arrive as transformers has them before the transpose: [B, T, H, D] views, often slices of one tensor.
"""

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastkern
from fastkern import runtime
from tests.oracle import assert_close, assert_compiled_matches_eager
from tests.ops.test_rope import frequencies, rotate_every_two, rotate_half
from tests.profiles import bounded

op_mod = importlib.import_module("fastkern.ops.rope_qk_norm")  # fastkern.ops.rope_qk_norm is the function
kernels_mod = importlib.import_module("fastkern.kernels.rope_qk_norm")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMS = {"llama": dict(weight_offset=0.0, cast_before_weight=True),
         "gemma": dict(weight_offset=1.0, cast_before_weight=False)}
LAYOUTS = ["contiguous", "fused_qkv", "heads_major", "col_strided"]


def per_token(cos, sin, position_ids):
    """cos/sin as [B or 1, T, 1, R] (broadcast over heads of [B, T, H, D])."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    return cos[:, :, None], sin[:, :, None]


def oracle(x, w, cos, sin, eps, form, interleaved, position_ids=None):
    """float64 norm then rotation of x [B, T, H, D]; differentiable in x and w."""
    c, s = per_token(cos.double(), sin.double(), position_ids)
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w + FORMS[form]["weight_offset"])
    r = c.shape[-1]
    rot = rotate_every_two if interleaved else rotate_half
    return torch.cat([n[..., :r] * c + rot(n[..., :r]) * s, n[..., r:]], dim=-1)


def eager(x, w, cos, sin, eps, form, interleaved, position_ids=None):
    """What transformers runs (Qwen3RMSNorm or Gemma3RMSNorm, then apply_rotary_pos_emb) in x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    n = (w * h.to(x.dtype)).to(x.dtype) if form == "llama" else (h * (1.0 + w.float())).to(x.dtype)
    c, s = per_token(cos.to(x.dtype), sin.to(x.dtype), position_ids)
    r = c.shape[-1]
    rot = rotate_every_two if interleaved else rotate_half
    return torch.cat([n[..., :r] * c + rot(n[..., :r]) * s, n[..., r:]], dim=-1)


def make_qk(b, t, hq, hk, d, dtype, layout, gen, scale=1.0, device="cpu"):
    """q [B, T, Hq, D] and k [B, T, Hk, D] in the requested layout (made in `dtype`, so views keep strides)."""
    def randn(*shape):
        return (torch.randn(shape, generator=gen) * scale).to(device, dtype)

    if layout == "fused_qkv":  # slices of one [B, T, (Hq + 2 Hk) D] projection, as Phi-3 / GLM have it
        qkv = randn(b, t, (hq + 2 * hk) * d)
        return qkv[..., :hq * d].unflatten(-1, (hq, d)), qkv[..., hq * d:(hq + hk) * d].unflatten(-1, (hk, d))
    if layout == "heads_major":  # [B, H, T, D] memory seen as [B, T, H, D]
        return randn(b, hq, t, d).transpose(1, 2), randn(b, hk, t, d).transpose(1, 2)
    if layout == "col_strided":  # element stride 2
        return randn(b, t, hq, 2 * d)[..., ::2], randn(b, t, hk, 2 * d)[..., ::2]
    return randn(b, t, hq, d), randn(b, t, hk, d)


def make_grad(shape, dtype, layout, gen, device="cpu"):
    if layout == "broadcast":  # stride 0 everywhere but the last dim, as the gradient of a .sum() is
        return torch.randn(shape[-1], generator=gen).to(device, dtype).expand(shape)
    if layout == "heads_major":  # what the transpose back from attention's [B, H, T, D] hands over
        return torch.randn(shape[0], shape[2], shape[1], shape[3], generator=gen).to(device, dtype).transpose(1, 2)
    return torch.randn(shape, generator=gen).to(device, dtype)


def make_weight(d, dtype, form, gen):
    # Around 1 for llama, around 0 for gemma (applied as 1 + weight).
    return (torch.randn(d, generator=gen) * 0.3 + 1.0 - FORMS[form]["weight_offset"]).to(dtype)


def check(*, b, t, hq, hk, d, rotary_dim, dtype, form, interleaved, table, layout, grad_layout, train_weight,
          weight_dtype, seed, eps=1e-6, scale=1.0, nan_at=None, random_tables=False, shared_tables=False,
          device="cpu"):
    """The op's outputs and gradients against the float64 oracle, with transformers' same-dtype run as the
    relative bound. random_tables: cos/sin any values (the gradient is exact for any, not only for
    cos_a = cos_b); shared_tables: cos/sin [1, T, R] shared by the batch (without position_ids)."""
    gen = torch.Generator().manual_seed(seed)
    q0, k0 = make_qk(b, t, hq, hk, d, dtype, layout, gen, scale, device)
    if nan_at is not None:
        q0[nan_at] = float("nan")
    wq0, wk0 = (make_weight(d, weight_dtype, form, gen).to(device) for _ in "qk")
    positions = torch.stack([torch.randperm(t + 3, generator=gen)[:t] for _ in range(b)])
    if table:
        cos, sin = frequencies(torch.arange(t + 3), rotary_dim, interleaved)
        kw = dict(position_ids=positions)
    else:
        cos, sin = frequencies(positions[:1] if shared_tables else positions, rotary_dim, interleaved)
        kw = {}
    if random_tables:
        cos, sin = torch.randn(cos.shape, generator=gen), torch.randn(sin.shape, generator=gen)
    cos, sin = cos.to(device, dtype), sin.to(device, dtype)
    kw = {name: v.to(device) for name, v in kw.items()}
    pos = kw.get("position_ids")
    gq, gk = (make_grad(x.shape, dtype, grad_layout, gen, device) for x in (q0, k0))

    q, k = q0.detach().requires_grad_(), k0.detach().requires_grad_()  # the views themselves: the op sees them
    wq, wk = wq0.clone().requires_grad_(train_weight), wk0.clone().requires_grad_(train_weight)
    q_out, k_out = fastkern.ops.rope_qk_norm(q, k, wq, wk, cos, sin, eps, interleaved=interleaved, **FORMS[form], **kw)
    assert q_out.is_contiguous() and k_out.is_contiguous() and q_out.dtype == k_out.dtype == dtype
    torch.autograd.backward((q_out, k_out), (gq, gk))

    x64 = [x.detach().double().requires_grad_() for x in (q0, k0, wq0, wk0)]
    xs = [x.detach().clone().requires_grad_() for x in (q0, k0, wq0, wk0)]
    want = [oracle(x64[i], x64[i + 2], cos, sin, eps, form, interleaved, pos) for i in (0, 1)]
    same = [eager(xs[i], xs[i + 2], cos, sin, eps, form, interleaved, pos) for i in (0, 1)]
    torch.autograd.backward(want, (gq.double(), gk.double()))
    torch.autograd.backward(same, (gq, gk))
    got = [q_out, k_out, q.grad, k.grad] + ([wq.grad, wk.grad] if train_weight else [])
    names = ["q_out", "k_out", "grad q", "grad k", "grad q_weight", "grad k_weight"]
    for name, g, w, s in zip(names, got, want + [x.grad for x in x64], same + [x.grad for x in xs]):
        assert_close(g, w, dtype, s, name)
    if train_weight:
        assert wq.grad.dtype == wk.grad.dtype == weight_dtype
    else:
        assert wq.grad is None and wk.grad is None
    return q_out, k_out, q.grad, k.grad, wq.grad, wk.grad


@st.composite
def cases(draw):
    d, rotary = draw(st.sampled_from([(64, 64), (128, 128), (80, 80), (80, 40), (64, 32)]))
    hk = draw(st.sampled_from([1, 2, 3]))
    return dict(b=draw(st.integers(1, 2)), t=draw(st.sampled_from([1, 3, 5, 7])), hk=hk,
                hq=hk * draw(st.sampled_from([1, 2, 3])), d=d, rotary_dim=rotary, interleaved=draw(st.booleans()),
                table=draw(st.booleans()), layout=draw(st.sampled_from(LAYOUTS)),
                grad_layout=draw(st.sampled_from(["contiguous", "heads_major", "broadcast"])),
                train_weight=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
                random_tables=draw(st.booleans()), shared_tables=draw(st.booleans()))


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@bounded(8)
@given(case=cases(), weight_same_dtype=st.booleans())
def test_matches_float64_oracle(dtype, form, case, weight_same_dtype):
    check(**case, dtype=dtype, form=form, weight_dtype=dtype if weight_same_dtype else torch.float32)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen3_like_shape(dtype, form):
    """Odd T, GQA 3:1, D=128, q and k slices of one fused projection, positions from a table."""
    check(b=2, t=7, hq=6, hk=2, d=128, rotary_dim=128, dtype=dtype, form=form, interleaved=False, table=True,
          layout="fused_qkv", grad_layout="heads_major", train_weight=True, weight_dtype=dtype, seed=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_matches_transformers_modules(dtype, form):
    """Qwen3RMSNorm / Gemma3RMSNorm then apply_rotary_pos_emb, run by transformers in `dtype`: in fp32 the
    same values (fused and the reference path bit for bit); in bf16/fp16 both against float64."""
    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    gen = torch.Generator().manual_seed(3)
    b, t, hq, hk, d = 2, 5, 4, 2, 64
    norms = [qwen3.Qwen3RMSNorm(d, eps=1e-6) if form == "llama" else gemma3.Gemma3RMSNorm(d, eps=1e-6) for _ in "qk"]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(make_weight(d, torch.float32, form, gen))
            m.to(dtype)
    q, k = make_qk(b, t, hq, hk, d, dtype, "fused_qkv", gen)
    cos, sin = (c.to(dtype) for c in frequencies(torch.arange(t)[None], d, False))
    want_q, want_k = qwen3.apply_rotary_pos_emb(norms[0](q).transpose(1, 2), norms[1](k).transpose(1, 2), cos, sin)
    got = fastkern.ops.rope_qk_norm(q, k, norms[0].weight, norms[1].weight, cos, sin, 1e-6, **FORMS[form])
    with runtime.force_reference():
        ref = fastkern.ops.rope_qk_norm(q, k, norms[0].weight, norms[1].weight, cos, sin, 1e-6, **FORMS[form])
    for name, g, r, want, x, w in (("q", got[0], ref[0], want_q, q, norms[0].weight),
                                   ("k", got[1], ref[1], want_k, k, norms[1].weight)):
        want = want.transpose(1, 2)
        if dtype == torch.float32:
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(r, want), f"{name}: the reference path is not transformers' computation"
        else:
            exact = oracle(x.double(), w.double(), cos, sin, 1e-6, form, False)
            assert_close(g, exact, dtype, want, name)
            assert_close(r, exact, dtype, want, f"{name} (reference path)")


@pytest.mark.parametrize("form", FORMS)
def test_reference_path_matches_oracle(form):
    with runtime.force_reference():
        check(b=2, t=3, hq=4, hk=2, d=80, rotary_dim=40, dtype=torch.bfloat16, form=form, interleaved=True, table=True,
              layout="fused_qkv", grad_layout="contiguous", train_weight=True, weight_dtype=torch.bfloat16, seed=5)


def test_float64_runs_the_reference_in_float64():
    gen = torch.Generator().manual_seed(0)
    q, k = (x.requires_grad_() for x in make_qk(1, 3, 2, 1, 8, torch.float64, "fused_qkv", gen))
    wq, wk = (torch.randn(8, dtype=torch.float64, requires_grad=True) for _ in "qk")
    cos, sin = frequencies(torch.arange(3)[None], 4, True)
    fn = lambda *a: fastkern.ops.rope_qk_norm(*a, cos, sin, 1e-5, interleaved=True, weight_offset=1.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, wq, wk))


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_stays_in_its_row(dtype):
    """A NaN in one token's head: that row of q_out and of dq is NaN, nothing else of q or k is; the weight
    gradient sums the NaN row (NaN, as PyTorch's); check's assert_close compares the NaN pattern."""
    q_out, k_out, dq, dk, dwq, dwk = check(
        b=1, t=3, hq=2, hk=1, d=64, rotary_dim=64, dtype=dtype, form="llama", interleaved=False, table=False,
        layout="contiguous", grad_layout="contiguous", train_weight=True, weight_dtype=dtype, seed=2,
        nan_at=(0, 1, 0, 5))
    for t in (q_out, dq):
        assert torch.isnan(t[0, 1, 0]).all() and torch.isfinite(t[0, 1, 1]).all() and torch.isfinite(t[0, ::2]).all()
    assert torch.isfinite(k_out).all() and torch.isfinite(dk).all() and torch.isfinite(dwk).all()
    assert torch.isnan(dwq).all()


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_values_do_not_overflow(dtype):
    # 300^2 * 64 is past fp16's range: the sum of squares is fp32.
    check(b=1, t=3, hq=2, hk=2, d=64, rotary_dim=64, dtype=dtype, form="gemma", interleaved=False, table=False,
          layout="contiguous", grad_layout="contiguous", train_weight=True, weight_dtype=dtype, seed=4, scale=300.0)


class _LaunchSpy:
    """Wraps a kernel: records (grid, HAS_WEIGHT_GRAD) of each launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((tuple(grid), kwargs.get("HAS_WEIGHT_GRAD")))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("train", [(True, True), (False, False), (True, False)])
def test_weight_grads_only_when_required(monkeypatch, train):
    """One forward launch and one backward launch; the weight-gradient reduction only when a weight
    requires grad, and a gradient only for the weight that does."""
    fwd = _LaunchSpy(kernels_mod.rope_qk_norm_forward_kernel)
    bwd = _LaunchSpy(kernels_mod.rope_qk_norm_backward_kernel)
    monkeypatch.setattr(kernels_mod, "rope_qk_norm_forward_kernel", fwd)
    monkeypatch.setattr(kernels_mod, "rope_qk_norm_backward_kernel", bwd)
    gen = torch.Generator().manual_seed(0)
    q, k = (x.requires_grad_() for x in make_qk(2, 5, 4, 2, 32, torch.float32, "fused_qkv", gen))
    wq = make_weight(32, torch.float32, "llama", gen).requires_grad_(train[0])
    wk = make_weight(32, torch.float32, "llama", gen).requires_grad_(train[1])
    cos, sin = frequencies(torch.arange(5)[None], 32, False)
    q_out, k_out = fastkern.ops.rope_qk_norm(q, k, wq, wk, cos, sin)
    (q_out.square().sum() + k_out.sum()).backward()
    assert (wq.grad is not None, wk.grad is not None) == train
    if runtime.path_for(q) == "interpreter":
        assert len(fwd.launches) == 1 and [flag for _, flag in bwd.launches] == [any(train)]


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("blocks,split,groups", [((2, 2), (15, True), 3), ((4, 1), (45, False), 5),
                                                 ((1, 4), (6, True), 2), ((32, 4), (12, False), 4)])
def test_gpu_tiling_under_the_interpreter(monkeypatch, blocks, split, groups):
    """The GPU's tiles (several head blocks, q's and k's, k's last block partly masked; tiles of tokens
    crossing the batch boundary) and the weight-gradient split over row groups, whole tiles (the GPU's)
    or ragged (the interpreter's default), each group's partial rows summed."""
    monkeypatch.setattr(op_mod, "_INTERPRETER_BLOCKS", blocks)
    monkeypatch.setattr(op_mod, "_INTERPRETER_SPLIT", split)
    spy = _LaunchSpy(kernels_mod.rope_qk_norm_backward_kernel)
    monkeypatch.setattr(kernels_mod, "rope_qk_norm_backward_kernel", spy)
    check(b=2, t=7, hq=6, hk=3, d=80, rotary_dim=40, dtype=torch.bfloat16, form="gemma", interleaved=False, table=True,
          layout="heads_major", grad_layout="contiguous", train_weight=True, weight_dtype=torch.float32, seed=7)
    n_blocks = -(-6 // blocks[1]) + -(-3 // blocks[1])
    if runtime.path_for(torch.empty(0)) == "interpreter":
        assert spy.launches == [((groups * n_blocks,), True)]


@pytest.mark.parametrize("form", FORMS)
def test_int64_offsets_variant_gives_the_same_result(monkeypatch, form):
    # Taken only past 2**31 elements (a GPU test): forced here.
    kw = dict(b=2, t=3, hq=2, hk=1, d=64, rotary_dim=32, dtype=torch.bfloat16, form=form, interleaved=True, table=True,
              layout="col_strided", grad_layout="contiguous", train_weight=True, weight_dtype=torch.bfloat16, seed=0)
    want = check(**kw)
    monkeypatch.setattr(op_mod, "_int64", lambda *a: True)
    got = check(**kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_empty_sequence():
    q, k = torch.randn(2, 0, 4, 16, requires_grad=True), torch.randn(2, 0, 2, 16, requires_grad=True)
    wq, wk = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    cos, sin = torch.zeros(1, 0, 16), torch.zeros(1, 0, 16)
    q_out, k_out = fastkern.ops.rope_qk_norm(q, k, wq, wk, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    (q_out.sum() + k_out.sum()).backward()
    assert torch.equal(wq.grad, torch.zeros(16)) and q.grad.shape == q.shape


def test_one_output_unused():
    """Only q_out feeds the loss: k's gradient is 0 and k_weight's too."""
    gen = torch.Generator().manual_seed(1)
    q, k = (x.requires_grad_() for x in make_qk(1, 3, 2, 1, 16, torch.float32, "contiguous", gen))
    wq, wk = (make_weight(16, torch.float32, "llama", gen).requires_grad_() for _ in "qk")
    cos, sin = frequencies(torch.arange(3)[None], 16, False)
    q_out, _ = fastkern.ops.rope_qk_norm(q, k, wq, wk, cos, sin)
    q_out.square().sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(wk.grad, torch.zeros_like(wk))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(0)
    cos, sin = frequencies(torch.arange(5)[None], 16, False)
    w = torch.randn(24, (4 + 2) * 16, generator=gen)
    gq = torch.randn(1, 5, 4, 16, generator=gen)

    def f(x, wq, wk):
        qk = x @ w
        q, k = qk[..., :64].unflatten(-1, (4, 16)), qk[..., 64:].unflatten(-1, (2, 16))
        q, k = fastkern.ops.rope_qk_norm(q, k, wq, wk, cos, sin, weight_offset=1.0, cast_before_weight=False)
        return (q * gq).sum() + (q[:, :, ::2] * k).square().sum()

    x = torch.randn(1, 5, 24, generator=gen, requires_grad=True)
    wq, wk = (torch.randn(16, generator=gen).requires_grad_() for _ in "qk")
    assert_compiled_matches_eager(f, x, wq, wk)


def test_custom_ops_are_registered():
    gen = torch.Generator().manual_seed(0)
    q, k = (x.requires_grad_() for x in make_qk(1, 3, 2, 1, 16, torch.float32, "fused_qkv", gen))
    wq, wk = (torch.randn(16, generator=gen, requires_grad=True) for _ in "qk")
    cos, sin = frequencies(torch.arange(4), 8, True)
    pos = torch.tensor([[3, 0, 1]])
    torch.library.opcheck(op_mod.rope_qk_norm_op, (q, k, wq, wk, cos, sin, pos, 1e-6, 1.0, False, True))
    torch.library.opcheck(op_mod.rope_qk_norm_op, (q, k, wq, wk, cos[None, :3], sin[None, :3], None, 1e-6, 0.0, True,
                                                   True))
    _, _, q_rstd, k_rstd = op_mod.rope_qk_norm_op(q, k, wq, wk, cos, sin, pos, 1e-6, 0.0, True, True)
    for need in (True, False):
        torch.library.opcheck(op_mod.rope_qk_norm_backward_op,
                              (torch.randn(q.shape), torch.randn(k.shape), q.detach(), k.detach(), wq.detach(),
                               wk.detach(), q_rstd, k_rstd, cos, sin, pos, 0.0, True, True, need))


def test_bad_inputs_raise_clear_errors():
    gen = torch.Generator().manual_seed(0)
    q, k = make_qk(2, 5, 4, 2, 16, torch.float32, "contiguous", gen)
    w = torch.randn(16)
    cos, sin = frequencies(torch.arange(5)[None], 16, False)
    f = fastkern.ops.rope_qk_norm
    with pytest.raises(TypeError, match="`q` has dtype torch.int64"):
        f(q.long(), k, w, w, cos, sin)
    with pytest.raises(TypeError, match="`k` has dtype"):
        f(q, k.half(), w, w, cos, sin)
    with pytest.raises(TypeError, match="`k_weight` must be a torch.Tensor"):
        f(q, k, w, [1.0] * 16, cos, sin)
    with pytest.raises(ValueError, match=r"4-D \[B, T, H, D\]"):
        f(q[0], k[0], w, w, cos, sin)
    with pytest.raises(ValueError, match="must agree in B, T and D"):
        f(q, k[:, :4], w, w, cos, sin)
    with pytest.raises(ValueError, match=r"`q_weight` must have shape \[16\]"):
        f(q, k, w[:8], w, cos, sin)
    with pytest.raises(ValueError, match="`eps` must be >= 0"):
        f(q, k, w, w, cos, sin, -1.0)
    with pytest.raises(TypeError, match="`weight_offset` must be a real number"):
        f(q, k, w, w, cos, sin, weight_offset="1")
    with pytest.raises(ValueError, match="same shape"):
        f(q, k, w, w, cos, sin[..., :8])
    with pytest.raises(ValueError, match=r"cos`/`sin` must be \[B or 1, T, rotary_dim\]"):
        f(q, k, w, w, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="must be even"):
        f(q, k, w, w, cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="must be even"):
        f(q, k, w, w, *frequencies(torch.arange(5)[None], 32, False))  # rotary_dim > head_dim
    with pytest.raises(ValueError, match="`rotary_dim`=8"):
        f(q, k, w, w, cos, sin, rotary_dim=8)
    table_cos, table_sin = frequencies(torch.arange(6), 16, False)
    with pytest.raises(IndexError, match=r"span \[0, 6\] but the cos/sin table has 6 rows"):
        f(q, k, w, w, table_cos, table_sin, position_ids=torch.tensor([[0, 1, 2, 3, 6]] * 2))
    with pytest.raises(ValueError, match="table"):
        f(q, k, w, w, cos, sin, position_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="`position_ids` must be"):
        f(q, k, w, w, table_cos, table_sin, position_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="`position_ids` has dtype"):
        f(q, k, w, w, table_cos, table_sin, position_ids=torch.zeros(2, 5))


# ---------------------------------------------------------------- GPU (pytest -m gpu on the device)


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("b,t,hq,hk,d,rotary_dim", [(2, 4096, 16, 8, 128, 128), (1, 2049, 32, 8, 128, 128),
                                                     (2, 513, 8, 1, 80, 40), (1, 1000, 20, 4, 256, 256)])
def test_gpu_real_sizes(form, b, t, hq, hk, d, rotary_dim):
    """Qwen3-0.6B and -8B attention shapes (and odd ones) in bf16, q/k slices of a fused projection."""
    check(b=b, t=t, hq=hq, hk=hk, d=d, rotary_dim=rotary_dim, dtype=torch.bfloat16, form=form, interleaved=False,
          table=False, layout="fused_qkv", grad_layout="heads_major", train_weight=True, weight_dtype=torch.bfloat16,
          seed=t, device="cuda")
