"""RMSNorm, llama and gemma forms: Triton kernel (interpreter on CPU) and reference vs a float64 oracle,
and parity with transformers' LlamaRMSNorm / GemmaRMSNorm."""

import importlib
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import fastkern
from fastkern import runtime
from fastkern.ops._common import needs_int64
from tests.oracle import assert_close, assert_compiled_matches_eager
from tests.profiles import bounded

rms_mod = importlib.import_module("fastkern.ops.rms_norm")  # fastkern.ops.rms_norm is the function
kernels_mod = importlib.import_module("fastkern.kernels.rms_norm")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMS = {
    "llama": dict(weight_offset=0.0, cast_before_weight=True),
    "gemma": dict(weight_offset=1.0, cast_before_weight=False),
}
LAYOUTS = ["contiguous", "lead_transposed", "row_padded", "col_strided", "col_transposed", "broadcast"]


def oracle(x, w, eps, form, dtype=None):
    """The function in x's dtype (float64 on CPU; fp32 for the GPU tests' reference).

    The llama form rounds xhat to the input `dtype` before the weight multiplies it: that rounding is
    part of LlamaRMSNorm's definition, so the oracle keeps it, straight through (the value and the weight
    gradient see the rounded xhat; dx treats the rounding as the identity, as autograd does for .to()).
    Without it the weight gradient's oracle would differ from every bf16 implementation, transformers'
    included, by the rounding of xhat, which a sum over rows of opposite sign turns into any relative error.
    """
    xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if form == "llama" and dtype is not None:
        xhat = xhat + (xhat.detach().to(dtype).to(x.dtype) - xhat.detach())
    return xhat * (w + FORMS[form]["weight_offset"])


def eager(x, w, eps, form):
    """transformers' module math (LlamaRMSNorm / GemmaRMSNorm forward), in x's dtype: PyTorch's own run."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if form == "llama":
        return (w * h.to(x.dtype)).to(x.dtype)  # .to: a fp32 weight would promote; the op returns x's dtype
    return (h * (1.0 + w.float())).to(x.dtype)


def make(shape, dtype, layout, scale, gen, device="cpu"):
    """A `dtype` tensor of `shape` (values ~ N(0, scale)) in the requested memory layout; the buffer is
    made in `dtype` first, so the view keeps its strides (a .to(dtype) after slicing would copy)."""
    *lead, n = shape

    def randn(*s):
        return (torch.randn(s, generator=gen, device=device) * scale).to(dtype)

    if layout == "lead_transposed" and len(lead) >= 2:  # leading dims permuted, last dim contiguous
        return randn(*lead[::-1], n).permute(*range(len(lead) - 1, -1, -1), len(lead))
    if layout in ("row_padded", "lead_transposed"):  # row stride n + 5, storage offset 2
        return randn(*lead, n + 5)[..., 2 : n + 2]
    if layout == "col_strided":  # last-dim stride 2
        return randn(*lead, 2 * n)[..., ::2]
    if layout == "col_transposed":  # last-dim stride = rows
        return randn(n, *lead).permute(*range(1, len(lead) + 1), 0)
    if layout == "broadcast":  # every row the same storage (row stride 0), as a grad of .sum() is
        return randn(n).expand(shape)
    return randn(*shape)


def make_weight(n, dtype, form, gen, device="cpu"):
    # Around 1 for llama, around 0 for gemma (its effective weight is 1 + weight).
    return (torch.randn(n, generator=gen, device=device) * 0.5 + 1.0 - FORMS[form]["weight_offset"]).to(dtype)


def grad_terms(x64, w64, dy, eps, form):
    """Float64 magnitudes of the terms each gradient element sums: (for dx, for dweight)."""
    x64, w64, dy = x64.detach(), w64.detach(), dy.detach().double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    xhat = x64 * rstd
    g = dy * (w64 + FORMS[form]["weight_offset"])
    dx_terms = rstd * (g.abs() + xhat.abs() * (g * xhat).abs().mean(-1, keepdim=True))
    return dx_terms, (dy * xhat).abs().reshape(-1, x64.shape[-1]).sum(0)


def assert_grad_close(actual, want, dtype, same, terms, name):
    """assert_close where the gradient is well conditioned (||terms|| <= 10 ||want||).

    Where its terms cancel, every fp32 implementation (transformers' included) loses the cancelled digits
    and a relative error norm measures the cancellation, not the kernel: hidden size 1, where
    dx = rstd * g * (1 - xhat^2) with xhat^2 = 1 - eps / (x^2 + eps), or a weight gradient summed over
    a couple of rows of opposite sign. There each element's error must stay within 64 fp32 ulps of the
    size of its terms, plus the final rounding to `dtype` (in fp16's subnormal range: half its spacing).
    """
    w, t = want.detach().double().cpu(), terms.detach().double().cpu()
    if t.norm() <= 10 * w.norm():
        assert_close(actual, want, dtype, same, name)
        return
    assert actual.shape == want.shape, name
    a = actual.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    info = torch.finfo(dtype)
    bound = 64 * 2.0**-24 * t + info.eps * w.abs() + info.tiny * info.eps
    err = (a - w).abs() - bound
    assert (err <= 0).all(), f"{name}: error over the cancellation bound by {err.max():.3e} (terms {t.max():.3e})"


def check(shape, dtype, form, layout, dy_layout, scale, eps, weight_dtype, train_weight, seed, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    n = shape[-1]
    x0 = make(shape, dtype, layout, scale, gen, device)
    w0 = make_weight(n, weight_dtype, form, gen, device)
    dy = make(shape, dtype, dy_layout, 1.0, gen, device)
    x = x0.detach().requires_grad_()  # the view itself: the op sees the layout
    w = w0.clone().requires_grad_(train_weight)
    y = fastkern.ops.rms_norm(x, w, eps, **FORMS[form])
    y.backward(dy)

    x64 = x0.detach().double().requires_grad_()
    w64 = w0.detach().double().requires_grad_()
    y64 = oracle(x64, w64, eps, form, dtype)
    y64.backward(dy.double())
    dx_terms, dw_terms = grad_terms(x64, w64, dy, eps, form)

    xt = x0.detach().clone().requires_grad_()
    wt = w0.clone().requires_grad_()
    yt = eager(xt, wt, eps, form)
    yt.backward(dy)

    assert y.dtype == dtype and y.shape == x0.shape
    assert_close(y, y64, dtype, yt, "out")
    assert x.grad.dtype == dtype and x.grad.shape == x0.shape
    assert_grad_close(x.grad, x64.grad, dtype, xt.grad, dx_terms, "grad_x")
    if train_weight:
        assert w.grad.dtype == weight_dtype and w.grad.shape == (n,)
        assert_grad_close(w.grad, w64.grad, dtype, wt.grad, dw_terms, "grad_weight")
    else:
        assert w.grad is None


def test_layouts_are_what_they_claim():
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        assert make((3, 4, 5), dtype, "lead_transposed", 1.0, gen).stride() == (5, 15, 1)
        assert make((3, 4, 5), dtype, "row_padded", 1.0, gen).stride() == (40, 10, 1)
        assert make((3, 4, 5), dtype, "col_strided", 1.0, gen).stride() == (40, 10, 2)
        assert make((3, 4, 5), dtype, "col_transposed", 1.0, gen).stride() == (4, 1, 12)
        assert make((3, 4, 5), dtype, "broadcast", 1.0, gen).stride() == (0, 0, 1)


# Hidden sizes: 1 (the cancelling case), odd small ones, and two past 1024 (BLOCK_N 2048 and 4096). No 2:
# there dx is the difference of nearly equal terms whenever dy happens to align with x, which a random
# draw does often enough for the fp32 bound to flake (any fp32 implementation does the same).
HIDDEN = [1, 3, 33, 100, 1025, 2500]


@st.composite
def shapes(draw):
    n = draw(st.sampled_from(HIDDEN))
    # The interpreter runs one program per row (forward): keep the wide rows few.
    lead = draw(st.lists(st.integers(1, 2 if n > 1024 else 5), min_size=0, max_size=3))
    return (*lead, n)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(
    shape=shapes(),
    layout=st.sampled_from(LAYOUTS),
    dy_layout=st.sampled_from(["contiguous", "col_strided", "broadcast"]),
    scale=st.sampled_from([1e-2, 1.0, 30.0]),
    eps=st.sampled_from([1e-6, 1e-5]),
    weight_same_dtype=st.booleans(),
    train_weight=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
@example(shape=(7,), layout="contiguous", dy_layout="contiguous", scale=1.0, eps=1e-6, weight_same_dtype=True,
         train_weight=True, seed=0)  # 1-D x
@example(shape=(1, 2500), layout="col_strided", dy_layout="col_strided", scale=1.0, eps=1e-6, weight_same_dtype=True,
         train_weight=True, seed=1)  # one row, wide, strided
@example(shape=(3, 1), layout="col_transposed", dy_layout="contiguous", scale=1.0, eps=1e-6, weight_same_dtype=True,
         train_weight=True, seed=2)  # hidden size 1
@example(shape=(2, 3, 33), layout="lead_transposed", dy_layout="broadcast", scale=30.0, eps=1e-5,
         weight_same_dtype=True, train_weight=False, seed=3)  # frozen weight
def test_rms_norm_matches_float64_oracle(dtype, form, shape, layout, dy_layout, scale, eps, weight_same_dtype,
                                         train_weight, seed):
    weight_dtype = dtype if weight_same_dtype else torch.float32
    check(shape, dtype, form, layout, dy_layout, scale, eps, weight_dtype, train_weight, seed)


@pytest.mark.parametrize("form", FORMS)
def test_reference_path_matches_oracle(form):
    with runtime.force_reference():
        assert runtime.path_for(torch.empty(0)) == "reference"
        check((5, 33), torch.bfloat16, form, "col_strided", "contiguous", 3.0, 1e-6, torch.bfloat16, True, 0)
        check((4, 1), torch.float32, form, "contiguous", "contiguous", 1.0, 1e-6, torch.float32, True, 1)


@pytest.mark.parametrize("form", FORMS)
def test_float64_runs_the_reference_in_float64(form):
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fastkern.ops.rms_norm(a, b, 1e-5, **FORMS[form]), (x, w))
    y = fastkern.ops.rms_norm(x, w, 1e-5, **FORMS[form])
    torch.testing.assert_close(y, oracle(x, w, 1e-5, form), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- transformers' own modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", FORMS)
def test_matches_transformers_module(dtype, form):
    if form == "llama":
        module = pytest.importorskip("transformers.models.llama.modeling_llama").LlamaRMSNorm(96, eps=1e-5)
        eps = module.variance_epsilon
    else:
        module = pytest.importorskip("transformers.models.gemma.modeling_gemma").GemmaRMSNorm(96, eps=1e-5)
        eps = module.eps
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.weight.copy_(make_weight(96, torch.float32, form, gen))
    module.to(dtype)
    x0 = make((3, 5, 96), dtype, "contiguous", 2.0, gen)
    dy = make((3, 5, 96), dtype, "contiguous", 1.0, gen)

    xt = x0.clone().requires_grad_()
    yt = module(xt)
    yt.backward(dy)
    x = x0.clone().requires_grad_()
    w = module.weight.detach().clone().requires_grad_()
    y = fastkern.ops.rms_norm(x, w, eps, **FORMS[form])
    y.backward(dy)
    x64 = x0.double().requires_grad_()
    w64 = module.weight.detach().double().requires_grad_()
    y64 = oracle(x64, w64, eps, form, dtype)
    y64.backward(dy.double())

    assert y.dtype == yt.dtype == dtype
    torch.testing.assert_close(y, yt)
    if dtype != torch.float32:
        # The same roundings in the same places (llama: xhat, then the product; gemma: once at the end):
        # bitwise equal but where a last-bit difference in the fp32 rstd (summation order) flips a rounding.
        assert (y == yt).double().mean() >= 0.99
    assert_close(y, y64, dtype, yt, "out")
    assert_close(x.grad, x64.grad, dtype, xt.grad, "grad_x")
    assert_close(w.grad, w64.grad, dtype, module.weight.grad, "grad_weight")
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad, xt.grad)
        torch.testing.assert_close(w.grad, module.weight.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", FORMS)
def test_weight_grad_sees_what_the_weight_multiplied(dtype, form):
    # One row: each weight-gradient element is a single product, dy * xhat, where the llama form's xhat
    # is the one rounded to x's dtype (what its weight multiplied) and the gemma form's the fp32 one.
    gen = torch.Generator().manual_seed(0)
    x0 = make((1, 300), dtype, "contiguous", 1.0, gen)
    dy = make((1, 300), dtype, "contiguous", 1.0, gen)
    w = make_weight(300, dtype, form, gen).requires_grad_()
    fastkern.ops.rms_norm(x0, w, **FORMS[form]).backward(dy)
    h = x0.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    if form == "llama":
        h = h.to(dtype).float()
    want = (dy.float() * h)[0].to(dtype)
    assert (w.grad == want).double().mean() >= 0.99  # but where a last-bit difference in rstd flips a rounding


# ---------------------------------------------------------------- edge cases


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_row(dtype, form):
    eps = 1e-6
    gen = torch.Generator().manual_seed(0)
    x0 = make((3, 40), dtype, "contiguous", 1.0, gen)
    x0[1] = 0
    w0 = make_weight(40, dtype, form, gen)
    dy = make((3, 40), dtype, "contiguous", 1.0, gen)
    y, rstd = rms_mod.rms_norm_forward_op(x0, w0, eps, **FORMS[form])
    torch.testing.assert_close(rstd[1], torch.tensor(1 / math.sqrt(eps)))  # rsqrt(0 + eps)
    assert (y[1] == 0).all()
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    fastkern.ops.rms_norm(x, w, eps, **FORMS[form]).backward(dy)
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    x64, w64 = x0.double().requires_grad_(), w0.double().requires_grad_()
    oracle(x64, w64, eps, form, dtype).backward(dy.double())
    assert_close(x.grad, x64.grad, dtype, None, "grad_x")  # the zero row's dx = rstd * g = g / sqrt(eps)
    assert_close(w.grad, w64.grad, dtype, None, "grad_weight")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_values_do_not_overflow(dtype, form):
    # 1e4 squared is past fp16's range (65504): the sum of squares must be taken in fp32.
    gen = torch.Generator().manual_seed(0)
    x0 = (1e4 * torch.sign(torch.randn(4, 64, generator=gen)) * (1 + torch.rand(4, 64, generator=gen))).to(dtype)
    w0 = make_weight(64, dtype, form, gen)
    dy = make((4, 64), dtype, "contiguous", 1.0, gen)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y = fastkern.ops.rms_norm(x, w, **FORMS[form])
    y.backward(dy)
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    x64, w64 = x0.double().requires_grad_(), w0.double().requires_grad_()
    y64 = oracle(x64, w64, 1e-6, form, dtype)
    y64.backward(dy.double())
    xt, wt = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    yt = eager(xt, wt, 1e-6, form)
    yt.backward(dy)
    assert_close(y, y64, dtype, yt, "out")
    assert_close(x.grad, x64.grad, dtype, xt.grad, "grad_x")
    assert_close(w.grad, w64.grad, dtype, wt.grad, "grad_weight")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7), (5, 0), (0,)])
def test_empty_input(shape, form):
    # No rows (an empty batch), or rows 0 wide: empty results and an all-zero weight gradient.
    x = torch.empty(shape, requires_grad=True)
    w = torch.randn(shape[-1], requires_grad=True)
    y = fastkern.ops.rms_norm(x, w, **FORMS[form])
    assert y.shape == shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros(shape[-1]))


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_stays_in_its_row(dtype, form):
    gen = torch.Generator().manual_seed(0)
    x0 = make((4, 33), dtype, "contiguous", 1.0, gen)
    x0[2, 5] = float("nan")
    w0 = make_weight(33, dtype, form, gen)
    dy = make((4, 33), dtype, "contiguous", 1.0, gen)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y = fastkern.ops.rms_norm(x, w, **FORMS[form])
    y.backward(dy)
    others = [0, 1, 3]
    assert torch.isnan(y[2]).all() and torch.isfinite(y[others]).all()
    assert torch.isnan(x.grad[2]).all() and torch.isfinite(x.grad[others]).all()
    assert torch.isnan(w.grad).all()  # every column sums the NaN row, as PyTorch's does
    x64, w64 = x0.double().requires_grad_(), w0.double().requires_grad_()
    oracle(x64, w64, 1e-6, form, dtype).backward(dy.double())
    assert_close(y[others], oracle(x0[others].double(), w0.double(), 1e-6, form, dtype), dtype, None, "out")
    assert_close(x.grad, x64.grad, dtype, None, "grad_x")  # checks the NaN pattern too


# ---------------------------------------------------------------- weight-gradient reduction


class _LaunchSpy:
    """Wraps the backward kernel and records each launch's grid, rows_per_program and HAS_WEIGHT_GRAD."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((tuple(grid), args[8], kwargs["HAS_WEIGHT_GRAD"]))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rows,programs,rows_per_program", [(1, 1, 1), (2, 2, 1), (3, 3, 1), (5, 3, 2), (7, 4, 2),
                                                            (17, 4, 5)])
def test_weight_grad_sums_across_programs(monkeypatch, rows, programs, rows_per_program, form):
    # Under the interpreter the launcher splits the rows over at most 4 programs, each writing one fp32
    # partial row (5 rows: 2 + 2 + 1; 17 rows: 5 + 5 + 5 + 2): every program's partial, the ragged last
    # one included, must be written and summed. With a frozen weight: one row per program, no partials.
    spy = _LaunchSpy(kernels_mod.rms_norm_backward_kernel)
    monkeypatch.setattr(kernels_mod, "rms_norm_backward_kernel", spy)
    gen = torch.Generator().manual_seed(rows)
    x0 = make((rows, 40), torch.float32, "contiguous", 1.0, gen)
    w0 = make_weight(40, torch.float32, form, gen)
    dy = make((rows, 40), torch.float32, "contiguous", 1.0, gen)
    x64, w64 = x0.double().requires_grad_(), w0.double().requires_grad_()
    oracle(x64, w64, 1e-6, form, torch.float32).backward(dy.double())
    for train_weight in (True, False):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_(train_weight)
        fastkern.ops.rms_norm(x, w, **FORMS[form]).backward(dy)
        assert_close(x.grad, x64.grad, torch.float32, None, "grad_x")
        if train_weight:
            assert_close(w.grad, w64.grad, torch.float32, None, "grad_weight")
        else:
            assert w.grad is None
    if runtime.path_for(x0) == "interpreter":
        block_m = rms_mod.launch_config(40)[0]  # frozen weight: one tile of block_m rows per program
        assert spy.launches == [((programs,), rows_per_program, True), ((-(-rows // block_m),), block_m, False)]


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("cols,rows", [(40, 70), (40, 200), (1000, 7), (3, 1000)])
def test_weight_grad_with_whole_tiles_per_program(monkeypatch, cols, rows):
    # The GPU's split (whole BLOCK_M-row tiles per program, the last program's tile ragged at n_rows),
    # run under the interpreter with 3 programs at most.
    monkeypatch.setattr(rms_mod, "_INTERPRETER_SPLIT", (3, True))
    block_m = rms_mod.launch_config(cols)[0]
    spy = _LaunchSpy(kernels_mod.rms_norm_backward_kernel)
    monkeypatch.setattr(kernels_mod, "rms_norm_backward_kernel", spy)
    gen = torch.Generator().manual_seed(rows)
    x0 = make((rows, cols), torch.float32, "row_padded", 1.0, gen)
    w0 = make_weight(cols, torch.float32, "llama", gen)
    dy = make((rows, cols), torch.float32, "contiguous", 1.0, gen)
    x64, w64 = x0.double().requires_grad_(), w0.double().requires_grad_()
    oracle(x64, w64, 1e-6, "llama", torch.float32).backward(dy.double())
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    fastkern.ops.rms_norm(x, w).backward(dy)
    assert_close(x.grad, x64.grad, torch.float32, None, "grad_x")
    assert_close(w.grad, w64.grad, torch.float32, None, "grad_weight")
    if runtime.path_for(x0) == "interpreter":
        (grid, rows_per_program, has_weight_grad), = spy.launches
        assert has_weight_grad and rows_per_program % block_m == 0 and grid[0] <= 3
        assert (grid[0] - 1) * rows_per_program < rows <= grid[0] * rows_per_program


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("form", FORMS)
def test_int64_offsets_variant_gives_the_same_result(monkeypatch, form):
    # The INT64_OFFSETS variant only switches on past 2**31 elements (a GPU test): force it here.
    gen = torch.Generator().manual_seed(0)
    x0 = make((3, 4, 33), torch.bfloat16, "col_strided", 1.0, gen)
    w0 = make_weight(33, torch.bfloat16, form, gen)
    dy = make((3, 4, 33), torch.bfloat16, "contiguous", 1.0, gen)

    def run():
        x, w = x0.detach().requires_grad_(), w0.clone().requires_grad_()
        y = fastkern.ops.rms_norm(x, w, **FORMS[form])
        y.backward(dy)
        return y, x.grad, w.grad

    want = run()
    monkeypatch.setattr(rms_mod, "needs_int64", lambda *tensors, slack=0: True)
    got = run()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- torch.compile and the custom ops


def test_torch_compile_fullgraph():
    x = torch.randn(3, 5, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    dy = torch.randn(3, 5, 24)

    def f(x, w):
        return ((fastkern.ops.rms_norm(x, w) + fastkern.ops.rms_norm(x, w, 1e-5, **FORMS["gemma"])) * dy).sum()

    assert_compiled_matches_eager(f, x, w)


def test_torch_compile_frozen_weight_computes_no_weight_grad(monkeypatch):
    # A frozen norm (LoRA) under torch.compile: dx matches eager and the backward launch is the one
    # without the weight-gradient reduction.
    spy = _LaunchSpy(kernels_mod.rms_norm_backward_kernel)
    monkeypatch.setattr(kernels_mod, "rms_norm_backward_kernel", spy)
    w = torch.randn(24)
    dy = torch.randn(6, 24)

    def f(x):
        return (fastkern.ops.rms_norm(x, w, **FORMS["gemma"]) * dy).sum()

    assert_compiled_matches_eager(f, torch.randn(6, 24, requires_grad=True))
    assert w.grad is None
    if runtime.path_for(w) == "interpreter":
        block_m = rms_mod.launch_config(24)[0]  # 6 rows: one tile
        assert spy.launches == [((1,), block_m, False)] * 2  # compiled, then eager


@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 8), (8,), (0, 8), (5, 0)])
def test_custom_ops_are_registered(shape):
    assert hasattr(torch.ops.fastkern, "rms_norm_forward") and hasattr(torch.ops.fastkern, "rms_norm_backward")
    n = shape[-1]
    x, w = torch.randn(shape, requires_grad=True), torch.randn(n, requires_grad=True)
    rows = x.shape[:-1].numel()
    # Rows 0 wide have a NaN rstd (the mean of nothing), which opcheck's value comparisons count as a
    # mismatch; the fake implementation's shapes (one rstd per row) are what that case checks.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if n == 0 else None
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(rms_mod.rms_norm_forward_op, (x, w, 1e-6, 0.0, True), **kw)
    torch.library.opcheck(rms_mod.rms_norm_forward_op, (x, w, 1e-6, 1.0, False), **kw)
    rstd = torch.rand(rows) + 0.5
    for need_weight_grad in (True, False):
        torch.library.opcheck(rms_mod.rms_norm_backward_op,
                              (torch.randn(shape), x.detach(), w.detach(), rstd, 0.0, True, need_weight_grad))


class TestBadInput:
    def test_weight_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"`weight` must have shape \[8\]"):
            fastkern.ops.rms_norm(torch.randn(2, 8), torch.randn(7))
        with pytest.raises(ValueError, match=r"`weight` must have shape \[8\]"):
            fastkern.ops.rms_norm(torch.randn(2, 8), torch.randn(1, 8))

    def test_integer_x(self):
        with pytest.raises(TypeError, match="`x` has dtype torch.int64"):
            fastkern.ops.rms_norm(torch.ones(2, 8, dtype=torch.long), torch.randn(8))

    def test_integer_weight(self):
        with pytest.raises(TypeError, match="`weight` has dtype torch.int32"):
            fastkern.ops.rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.int32))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="`weight` must be a torch.Tensor"):
            fastkern.ops.rms_norm(torch.randn(2, 3), [1.0, 1.0, 1.0])

    def test_scalar_x(self):
        with pytest.raises(ValueError, match="at least one dim"):
            fastkern.ops.rms_norm(torch.tensor(1.0), torch.randn(1))

    def test_negative_eps(self):
        with pytest.raises(ValueError, match="`eps` must be >= 0"):
            fastkern.ops.rms_norm(torch.randn(2, 8), torch.randn(8), -1e-6)

    @pytest.mark.parametrize("eps", ["1e-6", None, True, torch.tensor(1e-6)])
    def test_eps_not_a_number(self, eps):
        with pytest.raises(TypeError, match="`eps` must be a real number"):
            fastkern.ops.rms_norm(torch.randn(2, 8), torch.randn(8), eps)

    def test_weight_offset_not_a_number(self):
        with pytest.raises(TypeError, match="`weight_offset` must be a real number"):
            fastkern.ops.rms_norm(torch.randn(2, 8), torch.randn(8), weight_offset="1")

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="`weight` is on"):
            fastkern.ops.rms_norm(torch.randn(2, 8), torch.randn(8, device="cuda"))


# ---------------------------------------------------------------- GPU (pytest -m gpu on the device)


@pytest.mark.gpu
@bounded(12)  # each new width/dtype/layout compiles a kernel variant
@given(
    dtype=st.sampled_from(DTYPES),
    form=st.sampled_from(list(FORMS)),
    layout=st.sampled_from(LAYOUTS),
    rows=st.integers(1, 4096),
    n=st.sampled_from([1, 7, 1000, 2048, 3584, 4096, 5120, 8192]),
    train_weight=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_rms_norm_gpu_properties(dtype, form, layout, rows, n, train_weight, seed):
    check((rows, n), dtype, form, layout, "contiguous", 1.0, 1e-6, dtype, train_weight, seed, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
def test_rms_norm_gpu_real_size(form):
    # 16384 tokens of a 4096-wide model in bf16, against the exact function computed in fp32 on the GPU.
    rows, hidden, dtype, eps = 16384, 4096, torch.bfloat16, 1e-6
    gen = torch.Generator(device="cuda").manual_seed(0)
    x0 = make((rows, hidden), dtype, "contiguous", 1.0, gen, "cuda")
    w0 = make_weight(hidden, dtype, form, gen, "cuda")
    dy = make((rows, hidden), dtype, "contiguous", 1.0, gen, "cuda")
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y = fastkern.ops.rms_norm(x, w, eps, **FORMS[form])
    y.backward(dy)
    x32, w32 = x0.float().requires_grad_(), w0.float().requires_grad_()
    y32 = oracle(x32, w32, eps, form, dtype)
    y32.backward(dy.float())
    xt, wt = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    yt = eager(xt, wt, eps, form)
    yt.backward(dy)
    assert_close(y, y32, dtype, yt, "out")
    assert_close(x.grad, x32.grad, dtype, xt.grad, "grad_x")
    assert_close(w.grad, w32.grad, dtype, wt.grad, "grad_weight")


@pytest.mark.gpu
def test_rms_norm_gpu_more_than_2_31_elements():
    # 2**31 + 64 * 4096 bf16 elements in x (4.3 GB; y, dy and dx as much again): offsets past int32 take
    # the int64 kernel variant. Frozen weight (no partial buffers); check the first and the last rows.
    hidden, dtype, eps = 4096, torch.bfloat16, 1e-6
    rows = 2**31 // hidden + 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((rows, hidden), generator=gen, device="cuda", dtype=dtype)
    w = make_weight(hidden, dtype, "llama", gen, "cuda")
    assert x.numel() > 2**31 and needs_int64(x)
    x.requires_grad_()
    y = fastkern.ops.rms_norm(x, w, eps)
    dy = torch.randn((rows, hidden), generator=gen, device="cuda", dtype=dtype)
    y.backward(dy)
    torch.cuda.synchronize()
    for sl in (slice(0, 64), slice(rows - 64, rows)):
        x64 = x.detach()[sl].double().requires_grad_()
        y64 = oracle(x64, w.double(), eps, "llama", dtype)
        y64.backward(dy[sl].double())
        xt = x.detach()[sl].clone().requires_grad_()
        yt = eager(xt, w, eps, "llama")
        yt.backward(dy[sl])
        assert_close(y[sl], y64, dtype, yt, f"out rows {sl}")
        assert_close(x.grad[sl], x64.grad, dtype, xt.grad, f"grad_x rows {sl}")
