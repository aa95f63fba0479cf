"""fastkern.experimental.nf4_matmul (x @ W.T / x @ W with W dequantized inside the GEMM's tiles) against
the float64 oracle.

The oracle multiplies in float64 with the weight nf4_dequantize gives in x's dtype (the same rounded
values the kernel builds in its tiles), so only the kernel's fp32 accumulation is being judged; the
identity-matrix test checks the in-tile weight values themselves, exactly.
"""

import pytest
import torch
from hypothesis import example, given, strategies as st

import fastkern
from fastkern import runtime
from fastkern.experimental import nf4_matmul as nf4_matmul_module
from fastkern.experimental.nf4_matmul import nf4_matmul
from fastkern.ops import NF4State, nf4_dequantize, nf4_quantize
from tests.oracle import assert_close, assert_compiled_matches_eager
from tests.profiles import bounded

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _quantized(n, k, blocksize=64, nested=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    # Rows of different magnitudes, so the scales matter.
    w = torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g) * 3)
    return nf4_quantize(w.to(device), blocksize=blocksize, double_quant=nested)


def _weight(packed, state, dtype):
    """W as the kernel sees it: nf4_dequantize in x's dtype (fp32 values for fp64 x)."""
    return nf4_dequantize(packed, state, dtype=dtype if dtype != torch.float64 else torch.float32).to(dtype)


def _expected(x, packed, state, transpose):
    """(float64 oracle, torch's own result in x's dtype)."""
    w = _weight(packed, state, x.dtype)
    b = w if transpose else w.t()
    return x.double() @ b.double(), x @ b


def _check(x, packed, state, transpose, name="out"):
    got = nf4_matmul(x, packed, state, transpose=transpose)
    oracle, same = _expected(x, packed, state, transpose)
    assert got.is_contiguous() and got.dtype == x.dtype
    assert_close(got, oracle, x.dtype, same, name=name)
    return got


@bounded(8)
@given(
    m=st.sampled_from([1, 7, 70]), n=st.integers(17, 150), k=st.integers(17, 150),
    blocksize=st.sampled_from([32, 64, 256, 4096]), nested=st.booleans(), dtype=st.sampled_from(DTYPES),
    transpose=st.booleans(), seed=st.integers(0, 2**16),
)
@example(m=70, n=131, k=129, blocksize=64, nested=True, dtype=torch.bfloat16, transpose=False, seed=1)
@example(m=1, n=64, k=128, blocksize=64, nested=False, dtype=torch.float32, transpose=True, seed=2)
def test_matches_oracle(m, n, k, blocksize, nested, dtype, transpose, seed, poison_empty):
    packed, state = _quantized(n, k, blocksize, nested, seed)
    x = torch.randn(m, n if transpose else k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    _check(x, packed, state, transpose)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_values_exact(dtype, transpose, poison_empty):
    """An identity x returns W's values themselves: bit for bit what nf4_dequantize gives (odd K: rows
    of W start alternately on a high and a low nibble; nested scales; bf16 rounding)."""
    n, k = 37, 45
    packed, state = _quantized(n, k, 32, True, seed=3)
    w = nf4_dequantize(packed, state, dtype=dtype)
    eye = torch.eye(n if transpose else k, dtype=dtype)
    got = nf4_matmul(eye, packed, state, transpose=transpose)
    assert torch.equal(got, w if transpose else w.t())


@pytest.mark.parametrize("transpose", [False, True])
def test_output_rounded_to_nearest(transpose):
    """The fp32 accumulator is rounded to x's dtype to nearest (not truncated): nearly every element
    equals the float64 product rounded once (the fp32 accumulation error is far below a bf16 ulp)."""
    packed, state = _quantized(64, 96, 64, True, seed=4)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(16, 64 if transpose else 96).to(dtype)
        oracle, _ = _expected(x, packed, state, transpose)
        got = nf4_matmul(x, packed, state, transpose=transpose)
        assert (got == oracle.to(dtype)).double().mean() > 0.98, dtype


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(
    "m,n,k,blocksize,tiles,dtype",
    [
        # grouped launch order past GROUP_M row tiles; per-element scales
        (140, 45, 70, 32, (16, 16, 16), torch.bfloat16),
        (37, 64, 128, 64, (16, 32, 32), torch.float32),  # K % blocksize == 0: one scale per tile line
        # line scales in one mode, a tile wider than a scale block in the other
        (37, 64, 128, 64, (16, 16, 128), torch.float16),
        (21, 33, 96, 32, (32, 16, 16), torch.bfloat16),  # line scales, a partial last tile of rows of W
    ],
)
def test_small_tiles(m, n, k, blocksize, tiles, dtype, transpose, poison_empty):
    """The launcher with small tiles: several tiles along every dim, partial tiles at every edge."""
    from fastkern.ops.nf4 import flatten_state
    from fastkern.experimental.nf4_matmul import matmul_into

    if runtime.path_for(torch.empty(0)) != "interpreter":
        pytest.skip("launches the kernel directly (needs the Triton interpreter or a GPU)")
    packed, state = _quantized(n, k, blocksize, True, seed=m)
    s = flatten_state("test", packed, state, dtype)
    x = torch.randn(m, n if transpose else k).to(dtype)
    out = torch.empty(m, k if transpose else n, dtype=dtype)
    bm, bp, br = tiles
    matmul_into(out, x, s.packed, s.code, s.absmax, s.absmax2, s.code2, s.offset, s.blocksize,
                s.nested_blocksize, n, k, transpose, block_m=bm, block_p=bp, block_r=br)
    oracle, same = _expected(x, packed, state, transpose)
    assert_close(out, oracle, dtype, same)


@pytest.mark.parametrize("transpose", [False, True])
def test_leading_dims_and_strides(transpose, poison_empty):
    n, k = 40, 72
    packed, state = _quantized(n, k, 64, True, seed=5)
    r = n if transpose else k
    x = torch.randn(2, 3, r, dtype=torch.bfloat16)
    got = _check(x, packed, state, transpose, "3-D x")
    assert got.shape == (2, 3, k if transpose else n)
    _check(torch.randn(r, 2 * 5, dtype=torch.bfloat16).t()[::2], packed, state, transpose, "transposed view")
    _check(torch.randn(6, 3 * r, dtype=torch.float16)[:, 1::3], packed, state, transpose, "column stride 3")
    _check(torch.randn(3, 4, r, dtype=torch.float32).permute(1, 0, 2), packed, state, transpose, "permuted")
    _check(torch.randn(r, dtype=torch.float32), packed, state, transpose, "1-D x")
    empty = nf4_matmul(torch.empty(0, 3, r), packed, state, transpose=transpose)
    assert empty.shape == (0, 3, k if transpose else n)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_x(dtype, transpose):
    n, k = 48, 81
    packed, state = _quantized(n, k, 64, True, seed=7)
    r, p = (n, k) if transpose else (k, n)
    x = torch.randn(2, 5, r).to(dtype).requires_grad_()
    g = torch.randn(2, 5, p).to(dtype)
    nf4_matmul(x, packed, state, transpose=transpose).backward(g)
    w = _weight(packed, state, dtype)
    b = w if transpose else w.t()
    x64 = x.detach().double().requires_grad_()
    (x64 @ b.double()).backward(g.double())
    x_same = x.detach().clone().requires_grad_()
    (x_same @ b).backward(g)
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, dtype, x_same.grad, name="grad_x")


def test_float64_gradcheck():
    """fp64 runs the PyTorch reference; first and second derivatives through the autograd Function."""
    packed, state = _quantized(9, 20, 32, True, seed=8)
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: nf4_matmul(x, packed, state), (x,))
    assert torch.autograd.gradgradcheck(lambda x: nf4_matmul(x, packed, state, transpose=False) ** 2, (x,))
    oracle, _ = _expected(x.detach(), packed, state, False)
    assert_close(nf4_matmul(x, packed, state), oracle, torch.float64)


@pytest.mark.parametrize("transpose", [False, True])
def test_nan_in_x_propagates(transpose, poison_empty):
    n, k = 24, 40
    packed, state = _quantized(n, k, 64, False, seed=9)
    x = torch.randn(5, n if transpose else k, dtype=torch.bfloat16)
    x[2, 3] = float("nan")
    got = _check(x, packed, state, transpose)
    assert torch.isnan(got[2]).all() and not torch.isnan(got[[0, 1, 3, 4]]).any()


def test_int64_offsets(monkeypatch):
    """The INT64_OFFSETS variant (taken for weights past 2**31 elements) on a small problem."""
    monkeypatch.setattr(nf4_matmul_module, "INT32_MAX", 100)
    packed, state = _quantized(30, 50, 32, True, seed=10)
    for transpose in (False, True):
        _check(torch.randn(9, 30 if transpose else 50), packed, state, transpose)


def test_kernel_matches_reference_path():
    packed, state = _quantized(33, 65, 64, True, seed=11)
    x = torch.randn(6, 65, dtype=torch.float16)
    got = nf4_matmul(x, packed, state)
    with runtime.force_reference():
        ref = nf4_matmul(x, packed, state)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)


def test_bitsandbytes_quant_state():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(40, 96, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    for transpose in (False, True):
        x = torch.randn(7, 40 if transpose else 96, dtype=torch.bfloat16)
        _check(x, packed, state, transpose)
    # bitsandbytes' own dequantization is the weight the kernel multiplies by.
    from tests.bnb_reference import bnb_dequantize_4bit  # bitsandbytes' generic kernel (that file says why)

    w_bnb = bnb_dequantize_4bit(packed, state)
    assert torch.equal(nf4_matmul(torch.eye(96, dtype=torch.bfloat16), packed, state), w_bnb.t())


def test_bad_inputs_named():
    packed, state = _quantized(8, 64, 64, True)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"nf4_matmul: `x` has shape \(3, 64\).*transpose=True"):
        nf4_matmul(x, packed, state, transpose=True)
    with pytest.raises(ValueError, match=r"nf4_matmul: `x`"):
        nf4_matmul(torch.randn(3, 63), packed, state)
    with pytest.raises(TypeError, match=r"nf4_matmul: `x` has dtype torch.int64"):
        nf4_matmul(torch.ones(3, 64, dtype=torch.long), packed, state)
    with pytest.raises(TypeError, match=r"nf4_matmul: `packed`"):
        nf4_matmul(x, packed.to(torch.int32), state)
    with pytest.raises(TypeError, match=r"nf4_matmul: `quant_state`"):
        nf4_matmul(x, packed, object())
    bad_shape = NF4State(state.absmax, (8, 66), state.code, state.dtype, 64, state2=state.state2, offset=state.offset)
    with pytest.raises(ValueError, match=r"nf4_matmul: `packed` holds"):
        nf4_matmul(x, packed, bad_shape)
    three_d = NF4State(state.absmax, (2, 4, 64), state.code, state.dtype, 64, state2=state.state2,
                       offset=state.offset)
    with pytest.raises(ValueError, match=r"nf4_matmul: `quant_state.shape`.*2-D"):
        nf4_matmul(x, packed, three_d)
    with pytest.raises(TypeError, match=r"nf4_matmul: `transpose`"):
        nf4_matmul(x, packed, state, transpose=1)
    with pytest.raises(ValueError, match=r"nf4_matmul: `x` must have at least one dim"):
        nf4_matmul(torch.tensor(1.0), packed, state)
    with pytest.raises(ValueError, match=r"nf4_matmul: `x` is on meta"):
        nf4_matmul(x.to("meta"), packed, state)


@pytest.mark.parametrize("transpose", [False, True])
def test_compile_fullgraph(transpose):
    n, k = 24, 48
    packed, state = _quantized(n, k, 64, True, seed=12)
    x = torch.randn(2, 3, n if transpose else k, requires_grad=True)

    def f(x):
        return (nf4_matmul(x * 2, packed, state, transpose=transpose) ** 2).sum()

    assert_compiled_matches_eager(f, x)


@pytest.mark.gpu
@pytest.mark.parametrize("transpose", [False, True])
def test_gpu_real_size(transpose):
    n, k = 14336, 4096
    packed, state = _quantized(n, k, 64, True, device="cuda")
    w = nf4_dequantize(packed, state, dtype=torch.bfloat16)
    x = torch.randn(512, n if transpose else k, device="cuda", dtype=torch.bfloat16)
    b = w if transpose else w.t()
    got = nf4_matmul(x, packed, state, transpose=transpose)
    assert_close(got, x.double() @ b.double(), torch.bfloat16, torch.mm(x, b))
    # fp32 x: no TF32 inside the kernel (a TF32 product would miss the fp32 bound by far).
    xf = x[:64].float()
    wf = nf4_dequantize(packed, state, dtype=torch.float32)
    bf = wf if transpose else wf.t()
    assert_close(nf4_matmul(xf, packed, state, transpose=transpose), xf.double() @ bf.double(), torch.float32)


def test_output_can_be_updated_in_place_under_autograd():
    """The result is a plain tensor (not a view made inside the autograd Function), so a caller may
    accumulate into it, e.g. the LoRA term: nf4_matmul(x, ...).addmm_(x @ A.T, B.T)."""
    w = torch.randn(24, 32)
    packed, state = fastkern.ops.nf4_quantize(w)
    x = torch.randn(2, 3, 32, requires_grad=True)
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    y = nf4_matmul(x, packed, state)
    assert y._base is None and y.shape == (2, 3, 24)
    y.view(6, 24).addmm_(x.reshape(6, 32) @ a.T, b.T)
    y.sum().backward()
    dense = fastkern.ops.nf4_dequantize(packed, state)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
    (x2 @ dense.T + (x2 @ a2.T) @ b2.T).sum().backward()
    for got, want in ((x.grad, x2.grad), (a.grad, a2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_not_in_the_public_api():
    """Experimental (slower than dequantize + matmul on the GPU, used by no patcher): importable from
    fastkern.experimental only, so `fastkern env` does not list it."""
    assert "nf4_matmul" not in fastkern.ops.__all__ and not hasattr(fastkern.ops, "nf4_matmul")
    assert torch.ops.fastkern.nf4_matmul.default is nf4_matmul_module.nf4_matmul_op._opoverload
