"""SwiGLU / GeGLU: Triton kernel (interpreter on CPU) and reference vs a float64 oracle."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastkern
from fastkern import runtime
from fastkern.ops.glu import glu_backward_op, glu_forward_op
from tests.oracle import assert_close
from tests.profiles import bounded

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ACTS = ["silu", "gelu_tanh", "gelu"]


def fused(gate, up, act, **kw):
    if act == "silu":
        return fastkern.ops.swiglu(gate, up, **kw)
    return fastkern.ops.geglu(gate, up, "tanh" if act == "gelu_tanh" else "none", **kw)


def torch_glu(gate, up, act):
    if act == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none") * up


def make(shape, dtype, layout, scale, device="cpu"):
    """A tensor of `shape` with the requested memory layout (values ~ N(0, scale))."""
    if layout == "contiguous":
        t = torch.randn(shape, dtype=torch.float32, device=device) * scale
    elif layout == "transposed":  # last dim has a stride != 1
        t = (torch.randn(shape[::-1], dtype=torch.float32, device=device) * scale).permute(*range(len(shape) - 1, -1, -1))
    else:  # "sliced": a strided slice of a bigger buffer
        big = torch.randn(*shape[:-1], shape[-1] * 2 + 1, dtype=torch.float32, device=device) * scale
        t = big[..., 1::2][..., : shape[-1]]
    return t.to(dtype)


def check_glu(shape, dtype, act, layouts, scale, overwrite, device="cpu"):
    gate0 = make(shape, dtype, layouts[0], scale, device)
    up0 = make(shape, dtype, layouts[1], 1.0, device)
    grad_out = torch.randn(shape, dtype=torch.float32, device=device).to(dtype)
    # Leaves for the gradient check; with overwrite we feed non-leaf copies that backward may consume.
    gate = gate0.clone().requires_grad_()
    up = up0.clone().requires_grad_()
    g_in, u_in = (gate * 1, up * 1) if overwrite else (gate, up)
    out = fused(g_in, u_in, act, overwrite_inputs_in_backward=overwrite)
    out.backward(grad_out)

    g64 = gate0.double().requires_grad_()
    u64 = up0.double().requires_grad_()
    ref = torch_glu(g64, u64, act)
    ref.backward(grad_out.double())

    gt = gate0.clone().requires_grad_()
    ut = up0.clone().requires_grad_()
    same = torch_glu(gt, ut, act)
    same.backward(grad_out)

    assert out.dtype == dtype and out.shape == gate0.shape
    assert_close(out, ref, dtype, same, "out")
    assert_close(gate.grad, g64.grad, dtype, gt.grad, "grad_gate")
    assert_close(up.grad, u64.grad, dtype, ut.grad, "grad_up")
    assert gate.grad.dtype == dtype and up.grad.dtype == dtype


def test_cpu_runs_the_triton_kernel_under_the_interpreter():
    # CI must exercise the Triton kernel, not the reference; conftest enables the interpreter.
    assert runtime.path_for(torch.empty(0)) == "interpreter"


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).flatmap(
    lambda lead: st.integers(1, 300).map(lambda last: tuple(lead) + (last,))
)


@pytest.mark.usefixtures("poison_empty")
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(ACTS),
    layouts=st.tuples(*[st.sampled_from(["contiguous", "transposed", "sliced"])] * 2),
    scale=st.sampled_from([1.0, 4.0, 30.0]),
    overwrite=st.booleans(),
)
def test_glu_matches_float64_oracle(shape, dtype, act, layouts, scale, overwrite):
    check_glu(shape, dtype, act, layouts, scale, overwrite)


@pytest.mark.parametrize("act", ACTS)
def test_glu_reference_path_matches_oracle(act):
    with runtime.force_reference():
        assert runtime.path_for(torch.empty(0)) == "reference"
        check_glu((5, 33), torch.bfloat16, act, ("contiguous", "transposed"), 3.0, False)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(1,), (1, 1), (3, 1), (1, 1, 5)])
def test_size_one_and_empty(act, shape):
    # Single elements: a relative-norm bound is ill-conditioned where the derivative crosses zero
    # (gelu'(-0.75) = 0), so compare elementwise with an absolute floor instead.
    gate = torch.randn(shape, requires_grad=True)
    up = torch.randn(shape, requires_grad=True)
    out = fused(gate, up, act)
    out.backward(torch.ones(shape))
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = torch_glu(g64, u64, act)
    ref.backward(torch.ones(shape, dtype=torch.float64))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gate.grad.double(), g64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(up.grad.double(), u64.grad, rtol=1e-5, atol=1e-6)
    empty = torch.empty(0, 7, requires_grad=True)
    out = fused(empty, empty.detach().clone().requires_grad_(), act)
    assert out.shape == (0, 7)
    out.sum().backward()
    assert empty.grad.shape == (0, 7)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate_like_pytorch(act, dtype):
    gate = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, -1e4, 1e4, 3.0, -3.0, 60.0, -60.0]], dtype=dtype)
    up = torch.tensor([[1.0, 2.0, 1.5, float("nan"), 1.0, -1.0, float("inf"), 2.0, 1.0, 1.0]], dtype=dtype)
    out = fused(gate, up, act)
    ref = torch_glu(gate.double(), up.double(), act)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (out, ref)
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), (out, ref)
    finite = torch.isfinite(ref)
    assert torch.allclose(out[finite].double(), ref[finite], rtol=1e-2, atol=1e-2)
    # Backward at finite points stays finite; NaN in gate makes its gradient NaN.
    g = gate.clone().requires_grad_()
    fused(g, up, act).backward(torch.ones_like(gate))
    assert torch.isnan(g.grad[0, 0])
    assert torch.isfinite(g.grad[0, 4:6]).all() and torch.isfinite(g.grad[0, 7:]).all()


def test_float64_runs_the_reference_in_float64():
    g = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fastkern.ops.swiglu(a, b), (g, u))
    assert torch.autograd.gradcheck(lambda a, b: fastkern.ops.geglu(a, b, "tanh"), (g, u))


def test_overwrite_reuses_the_input_storage():
    gate = torch.randn(6, 40, requires_grad=True)
    up = torch.randn(6, 40, requires_grad=True)
    g_in, u_in = gate * 1, up * 1
    ptrs = (g_in.data_ptr(), u_in.data_ptr())
    seen = {}
    g_in.register_hook(lambda grad: seen.__setitem__("gate", grad.data_ptr()))
    u_in.register_hook(lambda grad: seen.__setitem__("up", grad.data_ptr()))
    fastkern.ops.swiglu(g_in, u_in, overwrite_inputs_in_backward=True).sum().backward()
    assert (seen["gate"], seen["up"]) == ptrs
    # Leaves are never overwritten, even when asked.
    leaf_g, leaf_u = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    before = leaf_g.detach().clone()
    fastkern.ops.swiglu(leaf_g, leaf_u, overwrite_inputs_in_backward=True).sum().backward()
    assert torch.equal(leaf_g.detach(), before)


def test_only_requested_gradients():
    gate = torch.randn(3, 17, requires_grad=True)
    up = torch.randn(3, 17)
    fastkern.ops.swiglu(gate, up).sum().backward()
    assert gate.grad is not None and up.grad is None


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_torch_compile_fullgraph(act):
    def f(g, u):
        return fused(g, u, act) * 2 + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    g = torch.randn(4, 5, 24, requires_grad=True)
    u = torch.randn(4, 5, 24, requires_grad=True)
    out = compiled(g, u)
    out.sum().backward()
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    ref = torch_glu(g2, u2, act) * 2 + 1
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g.grad, g2.grad)
    torch.testing.assert_close(u.grad, u2.grad)


def test_custom_ops_are_registered():
    assert hasattr(torch.ops.fastkern, "glu_forward")
    g, u = torch.randn(2, 3), torch.randn(2, 3)
    torch.library.opcheck(glu_forward_op, (g, u, "silu", False))
    torch.library.opcheck(glu_backward_op, (torch.randn(2, 3), g, u, "gelu_tanh"))


class TestBadInput:
    def test_shape_mismatch_names_argument(self):
        with pytest.raises(ValueError, match="`up` has shape"):
            fastkern.ops.swiglu(torch.randn(2, 3), torch.randn(2, 4))

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="`up` has dtype torch.float16"):
            fastkern.ops.swiglu(torch.randn(2, 3), torch.randn(2, 3).half())

    def test_integer_tensor(self):
        with pytest.raises(TypeError, match="`gate` has dtype torch.int64"):
            fastkern.ops.geglu(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="`up` must be a torch.Tensor"):
            fastkern.ops.swiglu(torch.randn(2, 3), [1, 2, 3])

    def test_bad_approximate(self):
        with pytest.raises(ValueError, match="approximate"):
            fastkern.ops.geglu(torch.randn(2, 3), torch.randn(2, 3), approximate="erf")

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="is on"):
            fastkern.ops.swiglu(torch.randn(2, 3), torch.randn(2, 3, device="cuda"))


# ---------------------------------------------------------------- GPU (pytest -m gpu on the device)

@pytest.mark.gpu
@bounded(12)  # each new shape/dtype/layout compiles a kernel variant: ~40 s for 30 on the H100
@given(
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(ACTS),
    layouts=st.tuples(*[st.sampled_from(["contiguous", "transposed", "sliced"])] * 2),
    overwrite=st.booleans(),
    rows=st.integers(1, 4096),
    cols=st.sampled_from([1, 7, 1000, 11008, 14336]),
)
def test_glu_gpu_properties(dtype, act, layouts, overwrite, rows, cols):
    check_glu((rows, cols), dtype, act, layouts, 4.0, overwrite, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("act", ACTS)
def test_glu_gpu_llama3_8b_mlp_size(act):
    # Llama-3-8B MLP at 8192 tokens: [8192, 14336] bf16.
    check_glu((8192, 14336), torch.bfloat16, act, ("contiguous", "contiguous"), 4.0, True, device="cuda")


@pytest.mark.gpu
def test_glu_gpu_int64_offsets_past_2_31_elements():
    # 2^31 + 2^20 elements per tensor (4 GiB each in bf16); compare the tail rows, where int32 offsets
    # would wrap, against the reference computed on those rows alone.
    cols = 16384
    rows = (2**31 + 2**20) // cols
    gate = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    out = fastkern.ops.swiglu(gate, up)
    for sl in (slice(0, 64), slice(rows - 64, rows)):
        ref = F.silu(gate[sl].double()) * up[sl].double()
        assert_close(out[sl], ref, torch.bfloat16, None, f"rows {sl}")
    dout = torch.randn_like(out)
    del out
    from fastkern.ops.glu import glu_backward_op as bwd

    dg, du = bwd(dout, gate, up, "silu")
    sl = slice(rows - 64, rows)
    g64 = gate[sl].double().requires_grad_()
    u64 = up[sl].double().requires_grad_()
    (F.silu(g64) * u64).backward(dout[sl].double())
    assert_close(dg[sl], g64.grad, torch.bfloat16, None, "grad_gate tail")
    assert_close(du[sl], u64.grad, torch.bfloat16, None, "grad_up tail")


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("act", ACTS)
def test_int64_code_path_on_small_inputs(flat, act):
    # The int64 variant only switches on past 2^31 elements (a GPU test); force it here so both
    # layouts of that code path run in CI too.
    from fastkern.ops.glu import _launch_backward, _launch_forward

    gate, up, dout = torch.randn(5, 300), torch.randn(5, 300), torch.randn(5, 300)
    out = torch.empty_like(gate)
    _launch_forward(gate, up, out, act, block=64, flat=flat, force_int64=True)
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    _launch_backward(dout, gate, up, dg, du, act, block=64, flat=flat, force_int64=True)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = torch_glu(g64, u64, act)
    ref.backward(dout.double())
    assert_close(out, ref, torch.float32, None, "out")
    assert_close(dg, g64.grad, torch.float32, None, "grad_gate")
    assert_close(du, u64.grad, torch.float32, None, "grad_up")


def test_flat_launch_int64_switch_and_contiguity_guard():
    # A flat launch's largest offset (masked lanes included) is below n + block: int32 up to there.
    from fastkern.ops._common import INT32_MAX
    from fastkern.ops.glu import _launch_forward, flat_needs_int64

    assert not flat_needs_int64(INT32_MAX - 2048, 2048)
    assert flat_needs_int64(INT32_MAX - 2047, 2048)
    assert flat_needs_int64(2**31 + 2**20, 2048)  # the GPU test's size takes the int64 variant
    gate = torch.randn(6, 5).t()  # not contiguous: a flat launch would read the wrong elements
    with pytest.raises(ValueError, match="flat=True needs contiguous"):
        _launch_forward(gate, gate.clone(), torch.empty(5, 6), "silu", flat=True)


def test_geglu_tanh_negative_tail_keeps_its_digits():
    # gelu_tanh(g) for g in [-12, -3] is 1e-61..1e-3: computing 1 + tanh(y) cancelled every digit there
    # (fp32 gave 0 for a true 1.8e-7; float64 PyTorch gives 0 below g = -9). The reference is the
    # exact identity gelu_tanh(g) = g * sigmoid(2y) in float64, which has no cancellation.
    g = torch.linspace(-12.0, -3.0, 301).requires_grad_()
    out = fastkern.ops.geglu(g, torch.ones(301), "tanh")
    out.backward(torch.ones(301))
    g64 = g.detach().double().requires_grad_()
    ref = g64 * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (g64 + 0.044715 * g64**3))
    ref.backward(torch.ones(301, dtype=torch.float64))
    representable = ref.detach().abs() > torch.finfo(torch.float32).tiny  # fp32 flushes the rest to 0
    for got, want in ((out.detach(), ref.detach()), (g.grad, g64.grad)):
        want = want[representable]
        assert ((got[representable].double() - want).abs() / want.abs()).max().item() < 1e-4


@pytest.mark.parametrize("path", ["eager function", "custom op"])
def test_overwrite_bumps_version_counters_on_both_paths(path):
    # Backward writes d(gate), d(up) into gate's and up's storage: every path must bump their version
    # counters, so another node that saved gate fails loudly instead of reading a gradient.
    g0, u0 = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    gate, up = g0 * 1, u0 * 1
    if path == "custom op":
        out = glu_forward_op(gate, up, "silu", True)
    else:
        out = fastkern.ops.swiglu(gate, up, overwrite_inputs_in_backward=True)
    versions = gate._version, up._version
    out.sum().backward()
    assert gate._version > versions[0] and up._version > versions[1]
    gate, up = g0 * 1, u0 * 1
    saved_elsewhere = (gate * gate).sum()
    out = glu_forward_op(gate, up, "silu", True) if path == "custom op" else fastkern.ops.swiglu(
        gate, up, overwrite_inputs_in_backward=True)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_elsewhere.backward()
