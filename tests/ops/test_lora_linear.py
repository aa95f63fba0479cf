"""lora_linear vs a float64 oracle: output and gradients of x, lora_A, lora_B (and bias), dense and NF4."""

import contextlib
import importlib

import pytest
import torch

from fastkern.ops import lora_linear, nf4_quantize
from fastkern.ops.nf4 import flatten_state
from fastkern.reference.lora_linear import dense_weight_reference, lora_linear_reference
from tests.oracle import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(m, n, k, r, dtype, nf4, bias, seed, blocksize=64, double_quant=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(device, dtype)
    b = (torch.randn(n, r, generator=g) / r**0.5).to(device, dtype)
    bias_t = torch.randn(n, generator=g).to(device, dtype) if bias else None
    state = None
    if nf4:
        w, state = nf4_quantize(w, blocksize=blocksize, double_quant=double_quant)
    return x, w, a, b, bias_t, state


def _check(x, w, a, b, scaling, bias, state, dtype, x_view=None):
    quant = None if state is None else flatten_state("test", w, state, dtype)
    w_dense = dense_weight_reference(w, quant, dtype)  # the exact weight the op multiplies with
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    bias_leaf = None if bias is None else bias.detach().clone().requires_grad_()
    xin = leaves[0] if x_view is None else x_view(leaves[0])
    out = lora_linear(xin, w, leaves[1], leaves[2], scaling, bias=bias_leaf, quant_state=state)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
    out.backward(grad_out)

    def run(cast):
        ls = [t.detach().to(cast).requires_grad_() for t in (x, a, b)]
        bl = None if bias is None else bias.detach().to(cast).requires_grad_()
        xi = ls[0] if x_view is None else x_view(ls[0])
        o = lora_linear_reference(xi, w_dense.to(cast), ls[1], ls[2], scaling, bias=bl)
        o.backward(grad_out.to(cast))
        return o, [t.grad for t in ls] + ([bl.grad] if bl is not None else [])

    oracle, oracle_grads = run(torch.float64)
    same, same_grads = run(dtype)
    assert_close(out, oracle, dtype, same, name="out")
    grads = [t.grad for t in leaves] + ([bias_leaf.grad] if bias_leaf is not None else [])
    for name, got, o, s in zip(("x", "lora_A", "lora_B", "bias"), grads, oracle_grads, same_grads):
        assert_close(got, o, dtype, s, name=f"grad {name}")


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k,r,bias,scaling", [
    (5, 33, 19, 1, True, 2.0),      # odd everything, M < K: accumulate path for dense
    (37, 24, 16, 8, False, 0.5),    # M >= K: concatenated path for dense
    (9, 40, 64, 16, True, 0.0),     # scaling 0: LoRA contributes nothing, grads of B are zero
    (70, 17, 63, 64, False, 1.7),
    (3, 130, 129, 128, True, 0.25),
    (12, 20, 40, 2, True, 1.0),     # scaling 1: the scale multiplications are skipped
])
def test_matches_float64_oracle(m, n, k, r, bias, scaling, dtype, nf4, poison_empty):
    x, w, a, b, bias_t, state = _inputs(m, n, k, r, dtype, nf4, bias, seed=m * 7 + r)
    _check(x, w, a, b, scaling, bias_t, state, dtype)


@pytest.mark.parametrize("double_quant,blocksize", [(False, 32), (True, 256)])
def test_nf4_variants_and_3d_noncontiguous_input(double_quant, blocksize):
    dtype = torch.bfloat16
    x, w, a, b, bias_t, state = _inputs(24, 20, 48, 4, dtype, True, True, seed=3, blocksize=blocksize,
                                        double_quant=double_quant)
    # x as a transposed 3-D view [2, 12, 48] built from a [12, 2, 48] buffer.
    _check(x, w, a, b, 1.5, bias_t, state, dtype, x_view=lambda t: t.view(12, 2, 48).transpose(0, 1))


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("trainable", ["B", "A+bias", "x"])
def test_only_some_inputs_need_grad(nf4, trainable):
    """Backward skips the gradients nobody asked for; the ones asked for stay exact."""
    dtype = torch.float32
    x, w, a, b, bias_t, state = _inputs(7, 20, 12, 4, dtype, nf4, True, seed=11)
    quant = None if state is None else flatten_state("test", w, state, dtype)
    w_dense = dense_weight_reference(w, quant, dtype)
    flags = {"x": "x" in trainable, "a": "A" in trainable, "b": "B" in trainable, "bias": "bias" in trainable}
    got = [t.clone().requires_grad_(flags[k]) for k, t in zip(flags, (x, a, b, bias_t))]
    ref = [t.double().requires_grad_(flags[k]) for k, t in zip(flags, (x, a, b, bias_t))]
    lora_linear(got[0], w, got[1], got[2], 1.5, bias=got[3], quant_state=state).sum().backward()
    lora_linear_reference(ref[0], w_dense.double(), ref[1], ref[2], 1.5, bias=ref[3]).sum().backward()
    for name, g, r in zip(flags, got, ref):
        if flags[name]:
            assert_close(g.grad, r.grad, dtype, name=f"grad {name}")
        else:
            assert g.grad is None


def test_bitsandbytes_params_and_quant_storage():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    dtype = torch.bfloat16
    x, w, a, b, _, _ = _inputs(10, 24, 32, 8, dtype, False, False, seed=5)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                       quant_storage=torch.bfloat16)
    _check(x, packed, a, b, 2.0, None, state, dtype)


def test_bad_inputs_named():
    x, w, a, b, _, _ = _inputs(4, 8, 16, 2, torch.float32, False, False, seed=0)
    with pytest.raises(TypeError, match="lora_A"):
        lora_linear(x, w, a.to(torch.int32), b, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, w, a, b.T, 1.0)
    with pytest.raises(ValueError, match="weight"):
        lora_linear(x, w[:, :15], a, b, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, w.clone().requires_grad_(), a, b, 1.0)
    with pytest.raises(TypeError, match="scaling"):
        lora_linear(x, w, a, b, torch.tensor(1.0))
    packed, state = nf4_quantize(torch.randn(8, 32))
    with pytest.raises(ValueError, match="quant_state.shape"):
        lora_linear(x, packed, a, b, 1.0, quant_state=state)


def test_compile_fullgraph():
    dtype = torch.float32
    x, w, a, b, bias_t, state = _inputs(6, 12, 32, 4, dtype, True, True, seed=9)
    a.requires_grad_()
    fn = torch.compile(lambda x, a: lora_linear(x, w, a, b, 0.5, bias=bias_t, quant_state=state), fullgraph=True,
                       backend="aot_eager")
    out = fn(x, a)
    out.sum().backward()
    a2 = a.detach().clone().requires_grad_()
    ref = lora_linear(x, w, a2, b, 0.5, bias=bias_t, quant_state=state)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(a.grad, a2.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("m", [512, 2048])
def test_real_size_gpu(nf4, m):
    x, w, a, b, bias_t, state = _inputs(m, 14336, 4096, 16, torch.bfloat16, nf4, True, seed=m, device="cuda")
    _check(x, w, a, b, 2.0, bias_t, state, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(2048, 2048), (512, 2048), (2048, 8192)], ids=["q", "k_v", "down"])
def test_llama_1b_projection_shapes_gpu(n, k):
    # The Llama-1B projections of the QLoRA end-to-end bench: q takes the [W | B] concatenated scheme,
    # k/v and down (2K > 3N) the accumulate scheme, which the 4096 -> 14336 case above never reaches.
    x, w, a, b, bias_t, state = _inputs(4096, n, k, 16, torch.bfloat16, True, False, seed=n + k, device="cuda")
    _check(x, w, a, b, 2.0, bias_t, state, torch.bfloat16)


def _checkpoint_grads(x, w, a, b, state, checkpointed):
    """Gradients of a small block around lora_linear (as in a decoder layer: the input is a function of
    the block's input, the output feeds a nonlinearity), with and without non-reentrant checkpointing."""
    from torch.utils.checkpoint import checkpoint

    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]

    def block(h, la, lb):
        y = lora_linear(h * 1.5, w, la, lb, 2.0, quant_state=state)
        return torch.nn.functional.silu(y)

    out = checkpoint(block, *leaves, use_reentrant=False) if checkpointed else block(*leaves)
    out.float().square().sum().backward()
    return [t.grad for t in leaves]


def _assert_checkpoint_parity(device, nf4, n, k):
    x, w, a, b, _, state = _inputs(64, n, k, 16, torch.bfloat16, nf4, False, seed=n + k + nf4, device=device)
    plain = _checkpoint_grads(x, w, a, b, state, False)
    recomputed = _checkpoint_grads(x, w, a, b, state, True)
    for name, got, want in zip(("x", "lora_A", "lora_B"), recomputed, plain):
        # The recomputation runs the same kernels on the same inputs: the gradients are identical.
        assert torch.equal(got, want), f"grad {name} differs under checkpointing: max abs diff " \
                                       f"{(got.float() - want.float()).abs().max().item():.3e}"


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("n,k", [(96, 64), (32, 64)], ids=["concat", "accumulate"])
def test_same_gradients_under_activation_checkpointing(nf4, n, k):
    _assert_checkpoint_parity("cpu", nf4, n, k)


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("n,k", [(2048, 2048), (512, 2048)], ids=["q", "k_v"])
def test_same_gradients_under_activation_checkpointing_gpu(nf4, n, k):
    # QLoRA models train with gradient checkpointing: the recomputation runs on autograd's thread.
    _assert_checkpoint_parity("cuda", nf4, n, k)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("n,k", [(96, 32), (48, 32), (16, 32)], ids=["n>2k", "2k<=3n", "narrow"])
def test_input_gradient_is_contiguous(nf4, n, k):
    # dX leaves the op contiguous on every scheme: downstream kernels may misread a strided gradient
    # (torch 2.11's cuDNN attention backward does, see test_attention_gradients_through_nf4_o_proj_gpu).
    x, w, a, b, _, state = _inputs(9, n, k, 4, torch.float32, nf4, False, seed=5)
    seen = []
    inner = x.clone().requires_grad_() * 1.0  # a non-leaf: its hook sees the op's dX as returned
    inner.register_hook(seen.append)
    lora_linear(inner, w, a.requires_grad_(), b.requires_grad_(), 2.0, quant_state=state).sum().backward()
    assert len(seen) == 1 and seen[0].shape == (9, k)
    assert seen[0].is_contiguous(), f"dX has strides {seen[0].stride()}"


def _parameters(w, a, b):
    # As a module holds them: a frozen base weight (NF4: the packed bytes), trainable adapters.
    return torch.nn.Parameter(w, requires_grad=False), torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("adapters", ["parameters", "cast copies"])
def test_saved_tensor_hooks_see_only_activations(nf4, adapters):
    # Parameters are held for backward by reference: saved-tensor hooks (checkpointing's, offloading's)
    # pack x and x @ A.T, plus A and B only when they are tensors made by the step (cast copies).
    x, w, a, b, bias_t, state = _inputs(7, 24, 16, 4, torch.float32, nf4, True, seed=3)
    weight, pa, pb = _parameters(w, a, b)
    x = x.requires_grad_()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        la, lb = (pa, pb) if adapters == "parameters" else (pa * 1.0, pb * 1.0)
        out = lora_linear(x, weight, la, lb, 2.0, bias=bias_t, quant_state=state)
    # What the op packs: x, x @ A.T (7 x 4) and, when they are cast copies, A and B; never the weight.
    assert not any(t.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr() for t in packed)
    assert not any(t is pa or t is pb for t in packed)
    expect = [(7, 16), (7, 4)] + ([] if adapters == "parameters" else [(4, 16), (24, 4)])
    assert [tuple(t.shape) for t in packed] == expect
    out.backward(torch.ones_like(out))
    # Plain tensors instead of parameters: everything is saved; the gradients are the same bits.
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    lora_linear(leaves[0], w.clone(), leaves[1], leaves[2], 2.0, bias=bias_t, quant_state=state).sum().backward()
    for name, got, want in zip(("x", "lora_A", "lora_B"), (x.grad, pa.grad, pb.grad), leaves):
        assert torch.equal(got, want.grad), name


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("which", ["weight", "lora_A", "lora_B"])
def test_parameter_modified_before_backward_raises(nf4, which):
    # A parameter held by reference and modified in place between forward and backward (an optimizer
    # step too early) raises in backward, as autograd does for a saved tensor.
    x, w, a, b, _, state = _inputs(5, 24, 16, 4, torch.float32, nf4, False, seed=4)
    weight, pa, pb = _parameters(w, a, b)
    out = lora_linear(x.requires_grad_(), weight, pa, pb, 0.5, quant_state=state)
    with torch.no_grad():
        {"weight": weight, "lora_A": pa, "lora_B": pb}[which].mul_(1)  # bumps the version only
    with pytest.raises(RuntimeError, match=f"modified by an inplace operation.*`{which}`"):
        out.sum().backward()


def _attention_then_projection(q, k, v, w, a, b, state, reference_weight=None):
    heads, t, d = q.shape[1], q.shape[2], q.shape[3]
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    o = o.transpose(1, 2).reshape(q.shape[0], t, heads * d)
    if reference_weight is not None:
        return lora_linear_reference(o, reference_weight, a, b, 2.0)
    return lora_linear(o, w, a, b, 2.0, quant_state=state)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1024, 4096], ids=["n=k", "n>2k"])
def test_attention_gradients_through_nf4_o_proj_gpu(n):
    # A QLoRA o_proj's dX is the attention's grad_out. With dX as a strided view (the [W | B] scheme
    # before the fix) torch 2.11's default (cuDNN) attention backward gave q/k/v gradients ~140% off.
    g = torch.Generator().manual_seed(n)
    q = torch.randn(2, 16, 256, 64, generator=g)
    k, v = torch.randn(2, 4, 256, 64, generator=g), torch.randn(2, 4, 256, 64, generator=g)
    w = torch.randn(n, 1024, generator=g) / 32
    a, b = torch.randn(16, 1024, generator=g) / 32, torch.randn(n, 16, generator=g) / 4
    packed, state = nf4_quantize(w.cuda().bfloat16())
    w_dense = dense_weight_reference(packed, flatten_state("test", packed, state, torch.bfloat16), torch.bfloat16)
    grad_out = torch.randn(2, 256, n, generator=g).cuda()

    def grads(dtype, reference):
        leaves = [t.cuda().to(dtype).requires_grad_() for t in (q, k, v, a, b)]
        out = _attention_then_projection(*leaves[:3], packed, leaves[3], leaves[4], state,
                                         w_dense.to(dtype) if reference else None)
        out.backward(grad_out.to(dtype))
        return [t.grad for t in leaves]

    oracle = grads(torch.float32, True)
    same = grads(torch.bfloat16, True)
    for name, got, o, s in zip("qkvAB", grads(torch.bfloat16, False), oracle, same):
        assert_close(got, o, torch.bfloat16, s, name=f"grad {name}")


def _count_dequantizations(monkeypatch):
    module = importlib.import_module("fastkern.ops.lora_linear")

    calls = []
    original = module.dequantize_into

    def counting(out, *args, **kwargs):
        calls.append(out.shape)
        return original(out, *args, **kwargs)

    monkeypatch.setattr(module, "dequantize_into", counting)
    return calls


def _grads_with_reuse(x, w, a, b, state, reuse: bool):
    from fastkern.ops.lora_linear import reusing_dequantized_weights

    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    with reusing_dequantized_weights() if reuse else contextlib.nullcontext():
        out = lora_linear(leaves[0] * 1.5, w, leaves[1], leaves[2], 2.0, quant_state=state)
    torch.nn.functional.silu(out).float().square().sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _assert_reuse_identical(monkeypatch, m, n, k, device):
    x, w, a, b, _, state = _inputs(m, n, k, 16, torch.bfloat16, True, False, seed=n + k, device=device)
    calls = _count_dequantizations(monkeypatch)
    fresh = _grads_with_reuse(x, w, a, b, state, reuse=False)
    assert len(calls) == 2  # forward and backward
    calls.clear()
    reused = _grads_with_reuse(x, w, a, b, state, reuse=True)
    assert len(calls) == 1, calls  # forward only
    for name, got, want in zip(("out", "x", "lora_A", "lora_B"), reused, fresh):
        if device == "cpu":
            assert torch.equal(got, want), f"{name} differs with the reused weight"
        else:
            # Same values of W; cuBLAS may pick another algorithm for W read with row stride K + r, so
            # the GEMM's summation order (not its inputs) may differ.
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            assert err < 1e-3, f"{name}: relative error {err:.2e} with the reused weight"


@pytest.mark.parametrize("n,k", [(96, 32), (48, 32), (16, 32)], ids=["n>2k", "2k<=3n", "narrow"])
def test_reused_dequantized_weight_gives_identical_gradients(monkeypatch, n, k):
    """Under reusing_dequantized_weights the backward takes the forward's 16-bit W (each forward /
    backward scheme pair: [W | B] in both, [W | B] forward with W alone backward, W in both) instead
    of dequantizing again; output and gradients are bit for bit those of a fresh dequantization."""
    _assert_reuse_identical(monkeypatch, 13, n, k, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(8192, 2048), (2048, 2048), (512, 2048), (2048, 8192)],
                         ids=["gate_up", "q_o", "k_v", "down"])
def test_reused_dequantized_weight_gives_identical_gradients_gpu(monkeypatch, n, k):
    # Llama-3.2-1B projections on cuBLAS, including W read as the first K columns of [W | B] (q_o).
    _assert_reuse_identical(monkeypatch, 4096, n, k, "cuda")


def test_reuse_skips_long_inputs_and_dense_weights(monkeypatch):
    module = importlib.import_module("fastkern.ops.lora_linear")

    calls = _count_dequantizations(monkeypatch)
    x, w, a, b, _, state = _inputs(13, 48, 32, 4, torch.float32, True, False, seed=2)
    monkeypatch.setattr(module, "REUSE_MAX_ROWS", 12)  # 13 rows: above the limit
    _grads_with_reuse(x, w, a, b, state, reuse=True)
    assert len(calls) == 2
    x, w, a, b, _, _ = _inputs(13, 48, 32, 4, torch.float32, False, False, seed=2)
    _grads_with_reuse(x, w, a, b, None, reuse=True)  # dense: nothing kept (W is the weight itself)
    assert getattr(module._reuse, "last", None) is None


def test_reuse_never_hands_one_call_another_calls_weight():
    """A W left by a forward whose autograd context was never set up is discarded by the next call, not
    used (each call checks that the kept W came from its own input), and a call without gradients
    keeps nothing."""
    module = importlib.import_module("fastkern.ops.lora_linear")

    x, w, a, b, _, state = _inputs(9, 48, 32, 4, torch.float32, True, False, seed=4)
    x2, w2, a2, b2, _, state2 = _inputs(9, 48, 32, 4, torch.float32, True, False, seed=5)
    nf4 = flatten_state("test", w, state, torch.float32)
    with module.reusing_dequantized_weights():
        with torch.no_grad():
            lora_linear(x, w, a, b, 2.0, quant_state=state)
        assert module._reuse.last is None
        module._forward_impl(x, nf4.packed, a, b, None, nf4.code, nf4.absmax, nf4.absmax2, nf4.code2, nf4.offset, 2.0,
                             nf4.blocksize, nf4.nested_blocksize)  # a stray forward
        assert module._reuse.last is not None and module._reuse.last[0] is x
        leaves = [t.clone().requires_grad_() for t in (x2, a2, b2)]
        out = lora_linear(leaves[0], w2, leaves[1], leaves[2], 2.0, quant_state=state2)
    assert module._reuse.last is None
    out.sum().backward()
    ref = [t.clone().requires_grad_() for t in (x2, a2, b2)]
    lora_linear(ref[0], w2, ref[1], ref[2], 2.0, quant_state=state2).sum().backward()
    for got, want in zip((t.grad for t in leaves), (t.grad for t in ref)):
        assert torch.equal(got, want)


def _fp32_adapters_and_cast_copies(nf4, seed):
    x, w, a, b, _, state = _inputs(7, 24, 32, 4, torch.bfloat16, nf4, False, seed=seed)
    a32 = torch.nn.Parameter(torch.randn(a.shape, generator=torch.Generator().manual_seed(seed)) / 6)
    b32 = torch.nn.Parameter(torch.randn(b.shape, generator=torch.Generator().manual_seed(seed + 1)) / 2)
    return x, w, a32, b32, state


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_float32_adapters_give_what_an_autograd_cast_gives(nf4):
    # PEFT keeps adapters in float32 under a bf16 model. Passed as they are, the op uses them in x's dtype
    # and returns their gradients in float32: the same values, bit for bit, as casting them with autograd
    # before the call (the cast's backward being the gradient's cast back).
    x, w, a32, b32, state = _fp32_adapters_and_cast_copies(nf4, seed=21)
    dy = torch.randn(7, 24, generator=torch.Generator().manual_seed(5)).bfloat16()
    runs = []
    for cast in (False, True):
        xl, al, bl = x.clone().requires_grad_(), a32.detach().clone(), b32.detach().clone()
        al, bl = torch.nn.Parameter(al), torch.nn.Parameter(bl)
        a_in, b_in = (al.bfloat16(), bl.bfloat16()) if cast else (al, bl)
        out = lora_linear(xl, w, a_in, b_in, 0.5, quant_state=state)
        out.backward(dy)
        runs.append((out, xl.grad, al.grad, bl.grad))
    for got, want, name in zip(runs[0], runs[1], ("out", "grad x", "grad lora_A", "grad lora_B")):
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert runs[0][2].dtype == torch.float32 and runs[0][3].dtype == torch.float32


def test_float32_adapter_cast_is_reused_by_the_rerun_until_the_parameter_changes():
    # A forward casts a float32 adapter afresh; a checkpoint's rerun (reusing_dequantized_weights) and
    # backward reuse that copy, unless the parameter changed in place since.
    ops_module = importlib.import_module("fastkern.ops.lora_linear")
    x, w, a32, b32, _ = _fp32_adapters_and_cast_copies(False, seed=22)
    with torch.no_grad():
        first = lora_linear(x, w, a32, b32, 1.0)
        copy = ops_module._casts[id(a32)][2]
        with ops_module.reusing_dequantized_weights():
            again = lora_linear(x, w, a32, b32, 1.0)
        assert ops_module._casts[id(a32)][2] is copy and torch.equal(first, again)  # the rerun reused it
        lora_linear(x, w, a32, b32, 1.0)
        assert ops_module._casts[id(a32)][2] is not copy  # a forward casts afresh
        copy = ops_module._casts[id(a32)][2]
        a32.mul_(-1.0)  # what an optimizer step does: in place, the version moves
        with ops_module.reusing_dequantized_weights():
            flipped = lora_linear(x, w, a32, b32, 1.0)
        assert ops_module._casts[id(a32)][2] is not copy
        assert not torch.equal(flipped, first)
        assert torch.equal(flipped, lora_linear(x, w, a32.bfloat16(), b32.bfloat16(), 1.0))  # the new values
    ident = id(a32)
    del a32
    assert ident not in ops_module._casts  # the entry goes with its parameter
