"""Inputs a new user can hand any public op: random strides and storage offsets on every tensor
argument (packed bytes and quant-state vectors included), arguments that alias each other, -inf / NaN /
huge values in valid and in ignored positions, empty and one-element dims.

Each result is compared with the float64 oracle (tests.oracle.assert_close: NaN/inf exactly where the
oracle has them) or with PyTorch raising. The first part pins the failures found by probing the ops
(each failed before its fix); the second part generates these classes of input for every op with
Hypothesis. Kept small: the whole file runs in about a minute under the Triton interpreter.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastkern
from fastkern.experimental.nf4_matmul import nf4_matmul
from fastkern.ops import (NF4State, fused_linear_cross_entropy, fused_linear_logprobs, lora_linear, nf4_dequantize,
                          nf4_quantize, rms_norm, rope, swiglu, geglu)
from fastkern.reference.glu import glu_forward_reference
from fastkern.reference.linear_cross_entropy import linear_cross_entropy_reference, linear_logprobs_reference
from fastkern.reference.rope import rope_reference
from tests.oracle import assert_close
from tests.profiles import bounded  # few examples under ci (each runs interpreted kernels), scaled by profile

INF, NAN = float("inf"), float("nan")


def relayout(t: torch.Tensor, perm=None, gaps=None, offset: int = 0) -> torch.Tensor:
    """t's values in another layout: dims ordered in memory by ``perm`` (innermost last), ``gaps[d]``
    elements between neighbours along dim d, the view starting ``offset`` elements into its storage.
    The rest of the storage holds garbage (NaN, or 0x5A bytes), so a kernel that reads it shows."""
    perm = list(range(t.dim())) if perm is None else list(perm)
    gaps = [1] * t.dim() if gaps is None else list(gaps)
    strides, step = [0] * t.dim(), 1
    for d in reversed(perm):
        strides[d] = step * gaps[d]
        step = strides[d] * max(t.shape[d], 1)
    size = offset + 1 + sum((n - 1) * s for n, s in zip(t.shape, strides) if n > 0)
    fill = NAN if t.dtype.is_floating_point else 0x5A
    buf = torch.full((size,), fill, dtype=t.dtype, device=t.device)
    out = buf.as_strided(t.shape, strides, offset)
    out.copy_(t)
    return out


@st.composite
def layouts(draw, t: torch.Tensor):
    """A random relayout of t (as a strategy over the layout)."""
    perm = draw(st.permutations(range(t.dim())))
    gaps = [draw(st.integers(1, 3)) for _ in range(t.dim())]
    return relayout(t, perm, gaps, draw(st.integers(0, 5)))


def frequencies(positions, rotary_dim, interleaved=False):
    inv = 10000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    f = positions.double()[..., None] * inv
    emb = f.repeat_interleave(2, -1) if interleaved else torch.cat([f, f], -1)
    return emb.cos().float(), emb.sin().float()


# ------------------------------------------------------------------------------------------------
# The cases found by probing (each failed before its fix)
# ------------------------------------------------------------------------------------------------

def _strided_state(state: NF4State) -> NF4State:
    """The same state with every tensor field in a strided layout over garbage."""
    s2 = state.state2
    nested = None if s2 is None else NF4State(relayout(s2.absmax, gaps=[3], offset=1), s2.shape,
                                              relayout(s2.code, gaps=[2], offset=3), s2.dtype, s2.blocksize,
                                              quant_type=s2.quant_type)
    return NF4State(relayout(state.absmax, gaps=[2], offset=5), state.shape, relayout(state.code, gaps=[3], offset=2),
                    state.dtype, state.blocksize, offset=state.offset, state2=nested)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("which", ["packed", "state", "both"])
def test_nf4_strided_packed_bytes_and_state(which, double_quant):
    # A [N, 1] byte tensor with row stride 2 was read as contiguous: errors of 7 / 36 / 41.
    w = torch.randn(8, 64)
    packed, state = nf4_quantize(w, double_quant=double_quant)
    p = relayout(packed, gaps=[2, 1], offset=3) if which != "state" else packed
    s = _strided_state(state) if which != "packed" else state
    want = nf4_dequantize(packed, state)
    assert torch.equal(nf4_dequantize(p, s), want)
    assert torch.equal(nf4_dequantize(p.t(), s), want.t())  # bitsandbytes' transposed form
    x = torch.randn(3, 64)
    assert_close(nf4_matmul(x, p, s), x.double() @ want.double().T, torch.float32)
    a, b = torch.randn(4, 64), torch.randn(8, 4)
    assert_close(lora_linear(x, p, a, b, 0.5, quant_state=s),
                 x.double() @ want.double().T + 0.5 * (x.double() @ a.double().T) @ b.double().T, torch.float32)


def _qk(b=1, hq=2, hk=2, t=5, d=8):
    return torch.randn(b, t, hq, d).transpose(1, 2), torch.randn(b, t, hk, d).transpose(1, 2)


@pytest.mark.parametrize("alias", ["same", "k_slice_of_q", "overlapping_views"])
@pytest.mark.parametrize("grad", [False, True])
def test_rope_inplace_aliased_qk_raises_and_writes_nothing(alias, grad):
    # rope(x, x) rotated the shared elements twice (error 4.5, no message).
    cos, sin = frequencies(torch.arange(5)[None], 8)
    base = torch.randn(1, 5, 4, 8, requires_grad=grad)
    x = (base * 1).transpose(1, 2) if grad else base.detach().transpose(1, 2)
    if alias == "same":
        q, k = x, x
    elif alias == "k_slice_of_q":
        q, k = x, x[:, 1:3]
    else:
        q, k = x[:, 0:2], x[:, 1:3]
    before = x.detach().clone()
    with pytest.raises(ValueError, match="share memory"):
        rope(q, k, cos, sin)
    assert torch.equal(x.detach(), before)
    # Out of place the same arguments are fine: both read the shared values before anything is written.
    q_rot, k_rot = rope(q, k, cos, sin, inplace=False)
    want_q, want_k = rope_reference(q.double(), k.double(), cos.double(), sin.double())
    assert_close(q_rot, want_q, torch.float32, name="q")
    assert_close(k_rot, want_k, torch.float32, name="k")


@pytest.mark.parametrize("grad", [False, True])
def test_rope_inplace_on_views_of_a_fused_qkv(grad):
    # q, k, v interleaved in one [B, T, 3H, D] projection output: disjoint elements, overlapping address
    # ranges. split() views cannot be modified in place under autograd: a fastkern message naming the
    # fix, raised before anything is written (it was PyTorch's internal view error, after the kernel ran).
    cos, sin = frequencies(torch.arange(5)[None], 8)
    leaf = torch.randn(1, 5, 6, 8, requires_grad=grad)
    qkv = leaf * 1 if grad else leaf.detach().clone()
    before = qkv.detach().clone()
    q, k, _ = (t.transpose(1, 2) for t in qkv.split(2, dim=2))
    want_q, want_k = rope_reference(q.double(), k.double(), cos.double(), sin.double())
    if grad:
        with pytest.raises(ValueError, match="split"):
            rope(q, k, cos, sin)
        assert torch.equal(qkv.detach(), before)
        q, k = qkv[:, :, 0:2].transpose(1, 2), qkv[:, :, 2:4].transpose(1, 2)  # the fix the message names
    q_rot, k_rot = rope(q, k, cos, sin)
    assert_close(q_rot, want_q, torch.float32, name="q")
    assert_close(k_rot, want_k, torch.float32, name="k")
    assert torch.equal(qkv.detach()[:, :, 4:], before[:, :, 4:])  # v untouched
    if grad:
        gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
        torch.autograd.backward((q_rot, k_rot), (gq, gk))
        want_gq, want_gk = rope_reference(gq.double(), gk.double(), cos.double(), sin.double(), transpose=True)
        assert_close(leaf.grad[:, :, 0:2].transpose(1, 2), want_gq, torch.float32, name="grad q")
        assert_close(leaf.grad[:, :, 2:4].transpose(1, 2), want_gk, torch.float32, name="grad k")
        assert torch.equal(leaf.grad[:, :, 4:], torch.zeros_like(leaf.grad[:, :, 4:]))


@pytest.mark.parametrize("layout", ["projection_views", "general"])
@pytest.mark.parametrize("inplace", [True, False])
def test_rope_backward_leaves_the_callers_gradients_alone(layout, inplace):
    # The in-place backward rotated the incoming gradients in their own storage.
    cos, sin = frequencies(torch.arange(5)[None], 8)
    heads = 2 if layout == "projection_views" else 3
    qp = torch.randn(1, 5, heads, 8, requires_grad=True)
    kp = torch.randn(1, 5, heads, 8, requires_grad=True)
    q, k = (qp * 1).transpose(1, 2), (kp * 1).transpose(1, 2)
    if layout == "general":  # slices of projection outputs take the general path, whole ones the fast path
        q, k = q[:, 1:], k[:, :2]
    q_rot, k_rot = rope(q, k, cos, sin, inplace=inplace)
    gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    gq0, gk0 = gq.clone(), gk.clone()
    torch.autograd.backward((q_rot, k_rot), (gq, gk))
    assert torch.equal(gq, gq0) and torch.equal(gk, gk0)
    want_q, _ = rope_reference(gq.double(), gq.double(), cos.double(), sin.double(), transpose=True)
    assert_close(qp.grad.transpose(1, 2)[:, heads - 2:], want_q, torch.float32, name="grad q")


def _masked_bias(v, masked=(3,)):
    bias = torch.randn(v) * 0.1
    bias[list(masked)] = -INF
    return bias


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_with_masked_vocabulary_bias(reduction, label_smoothing):
    # A -inf bias entry (masked vocabulary) made every row NaN (0 * -inf in the smoothing term, and
    # exp(-inf - -inf) when a whole block of the row was -inf).
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    bias = _masked_bias(40, masked=range(0, 37))  # the first block of every row all -inf but 3 columns
    y = torch.tensor([37, 38, -100, 39, 38, 37])
    got = fused_linear_cross_entropy(h, w, y, bias=bias, reduction=reduction, label_smoothing=label_smoothing)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = F.cross_entropy(h64 @ w64.T + bias.double(), y, reduction=reduction, label_smoothing=label_smoothing)
    assert_close(got, want, torch.float32)
    if label_smoothing == 0.0:  # with smoothing the loss is +inf, as F.cross_entropy's
        got.sum().backward()
        want.sum().backward()
        assert_close(h.grad, h64.grad, torch.float32, name="grad hidden")
        assert_close(w.grad, w64.grad, torch.float32, name="grad weight")


def test_cross_entropy_row_with_a_minus_inf_logit():
    h, w = torch.randn(3, 4), torch.randn(5, 4) * 0.1
    h[1, 0], w[2, 0], w[:, 0] = 3e38, -2.0, 0.0  # row 1's logit 2 overflows to -inf; the others stay finite
    w[2, 0] = -2.0
    y = torch.tensor([1, 0, 4])
    z = (h.double() @ w.double().T).float().double()  # the fp32 logits, -inf included
    assert torch.isneginf(z[1, 2]) and torch.isfinite(z[[0, 2]]).all()
    for reduction in ("mean", "none"):
        assert_close(fused_linear_cross_entropy(h, w, y, reduction=reduction),
                     F.cross_entropy(z, y, reduction=reduction), torch.float32, name=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_cross_entropy_non_finite_hidden_in_an_ignored_row(reduction, bad):
    # NaN under an ignored label made the mean NaN; F.cross_entropy skips the row.
    h, w = torch.randn(4, 8), torch.randn(11, 8)
    h[2] = bad
    y = torch.tensor([1, 0, -100, 5])
    got = fused_linear_cross_entropy(h, w, y, reduction=reduction)
    want = F.cross_entropy(h.double() @ w.double().T, y, reduction=reduction)
    assert_close(got, want, torch.float32)


def test_logprobs_entropy_with_masked_vocabulary_bias():
    # Correct log-probs, NaN entropy (0 * -inf), and NaN gradients through the entropy.
    h, w = torch.randn(5, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    bias = _masked_bias(40, masked=range(1, 39))
    t = torch.tensor([0, 39, 0, 39, 3])  # 3 is masked: log-prob -inf, as log_softmax gives
    lp, ent = fused_linear_logprobs(h, w, t, bias=bias, return_entropy=True)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want_lp, want_ent = linear_logprobs_reference(h64, w64, t, bias=bias.double())
    assert_close(lp, want_lp, torch.float32, name="logp")
    assert_close(ent, want_ent, torch.float32, name="entropy")
    assert torch.isfinite(ent).all()
    keep = torch.isfinite(want_lp)
    (lp[keep].sum() + ent.sum()).backward()
    (want_lp[keep].sum() + want_ent.sum()).backward()
    assert_close(h.grad, h64.grad, torch.float32, name="grad hidden")
    assert_close(w.grad, w64.grad, torch.float32, name="grad weight")


def test_small_argument_errors():
    h, w, y = torch.randn(4, 8), torch.randn(11, 8), torch.tensor([1, 0, 2, 5])
    for n in (0, torch.tensor(0), -3, NAN):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            fused_linear_cross_entropy(h, w, y, num_items_in_batch=n)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(h, w, y, chunk_size=True)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_logprobs(h, w, y, chunk_size=True)
    with pytest.raises(TypeError, match="ignore_index"):
        fused_linear_cross_entropy(h, w, y, ignore_index=None)
    torch.testing.assert_close(fused_linear_cross_entropy(h, w, y, num_items_in_batch=torch.tensor(8)),
                               F.cross_entropy(h @ w.T, y, reduction="sum") / 8)


def test_compile_fullgraph_of_the_ops_forward_and_backward():
    # Dynamo stopped at untyped_storage().data_ptr() in swiglu's overwrite check; the in-place rope goes
    # through its functional custom op while compiling.
    cos, sin = frequencies(torch.arange(5)[None], 8)
    w_qk = torch.randn(16, 32) * 0.2
    w_up = torch.randn(16, 32) * 0.2
    head = torch.randn(11, 16) * 0.2
    labels = torch.tensor([[1, 0, -100, 5, 10]])

    def step(x, norm_w):
        h = rms_norm(x, norm_w)
        qk = h @ w_qk
        q, k = qk[..., :16].view(1, 5, 2, 8).transpose(1, 2), qk[..., 16:].view(1, 5, 2, 8).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        gu = h @ w_up
        mlp = swiglu(gu[..., :16], gu[..., 16:], overwrite_inputs_in_backward=True)
        out = mlp + (q * k).transpose(1, 2).reshape(1, 5, 16)
        loss = fused_linear_cross_entropy(out.view(5, 16), head, labels.view(5))
        lp = fused_linear_logprobs(out.view(5, 16), head, labels.clamp(min=0).view(5))
        return loss - 0.1 * lp.sum()

    x = torch.randn(1, 5, 16, requires_grad=True)
    norm_w = torch.rand(16, requires_grad=True)
    from tests.oracle import assert_compiled_matches_eager

    assert_compiled_matches_eager(step, x, norm_w)


# ------------------------------------------------------------------------------------------------
# Properties: every public op, random layouts, aliasing, special values, empty and one-element dims
# ------------------------------------------------------------------------------------------------

def _special(draw, t: torch.Tensor, values, max_count=3) -> torch.Tensor:
    """t with up to max_count of its elements replaced by drawn special values."""
    t = t.clone()
    if t.numel():
        for _ in range(draw(st.integers(0, max_count))):
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(values))
    return t


@bounded(10)
@given(data=st.data(), b=st.integers(1, 2), hk=st.integers(1, 2), group=st.integers(1, 2), t=st.sampled_from([0, 1, 3]),
       d=st.sampled_from([2, 8]), partial=st.booleans(), interleaved=st.booleans(), positions=st.booleans(),
       inplace=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_rope_property(data, b, hk, group, t, d, partial, interleaved, positions, inplace, dtype, poison_empty):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))  # values replay with the example
    r = 2 if partial and d > 2 else d
    q = data.draw(layouts(torch.randn(b, group * hk, t, d).to(dtype)))
    k = data.draw(layouts(torch.randn(b, hk, t, d).to(dtype)))
    if positions:
        pos = data.draw(layouts(torch.randint(0, 7, (data.draw(st.sampled_from([1, b])), t))))
        cos, sin = frequencies(torch.arange(7), r, interleaved)
    else:
        pos = None
        cos, sin = frequencies(torch.arange(t)[None].expand(data.draw(st.sampled_from([1, b])), t), r, interleaved)
    cos, sin = data.draw(layouts(cos)), data.draw(layouts(sin))
    want_q, want_k = rope_reference(q.double(), k.double(), cos.double(), sin.double(), pos, interleaved)
    q_in, k_in = q.clone(), k.clone()
    q_rot, k_rot = rope(q, k, cos, sin, position_ids=pos, interleaved=interleaved, inplace=inplace)
    assert_close(q_rot, want_q, dtype, rope_reference(q_in, k_in, cos, sin, pos, interleaved)[0], name="q")
    assert_close(k_rot, want_k, dtype, rope_reference(q_in, k_in, cos, sin, pos, interleaved)[1], name="k")
    if inplace:
        assert torch.equal(q, q_rot) and torch.equal(k, k_rot)
    else:
        assert torch.equal(q, q_in) and torch.equal(k, k_in)


@bounded(8)
@given(data=st.data(), alias=st.sampled_from(["same", "overlap", "fused", "fused_overlap"]), inplace=st.booleans())
def test_rope_aliasing_property(data, alias, inplace):
    """Arguments that share memory: in place, overlapping q and k raise (nothing written) and disjoint
    views of one tensor are rotated correctly; out of place every case is correct."""
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))  # values replay with the example
    t, d = data.draw(st.integers(1, 3)), 4
    cos, sin = frequencies(torch.arange(t)[None], d)
    fused = data.draw(layouts(torch.randn(1, t, 4, d)))
    if alias == "same":
        q = k = fused.transpose(1, 2)
    elif alias == "overlap":
        q, k = fused[:, :, 0:2].transpose(1, 2), fused[:, :, 1:3].transpose(1, 2)
    elif alias == "fused":
        q, k = fused[:, :, 0:2].transpose(1, 2), fused[:, :, 2:4].transpose(1, 2)
    else:  # k's elements interleave with q's and one head is shared
        q, k = fused[:, :, 0:3:2].transpose(1, 2), fused[:, :, 2:4].transpose(1, 2)
    overlapping = alias != "fused"
    want_q, want_k = rope_reference(q.double(), k.double(), cos.double(), sin.double())
    before = fused.clone()
    if inplace and overlapping:
        with pytest.raises(ValueError, match="share memory"):
            rope(q, k, cos, sin)
        assert torch.equal(fused, before)
        return
    q_rot, k_rot = rope(q, k, cos, sin, inplace=inplace)
    assert_close(q_rot, want_q, torch.float32, name="q")
    assert_close(k_rot, want_k, torch.float32, name="k")


def _glu_oracle(gate, up, activation):
    return glu_forward_reference(gate.double(), up.double(), activation)


@bounded(10)
@given(data=st.data(), rows=st.sampled_from([0, 1, 3]), cols=st.sampled_from([1, 5, 33]),
       act=st.sampled_from(["silu", "gelu_tanh", "gelu"]), alias=st.sampled_from([None, "same", "halves"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_glu_property(data, rows, cols, act, alias, dtype, poison_empty):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))  # values replay with the example
    values = [INF, -INF, NAN, 1e15, -1e15, 0.0]
    if alias == "halves":  # gate and up are the two halves of one tensor (a fused gate_up projection)
        both = data.draw(layouts(_special(data.draw, torch.randn(rows, 2 * cols), values).to(dtype)))
        gate, up = both[:, :cols], both[:, cols:]
    else:
        gate = data.draw(layouts(_special(data.draw, torch.randn(rows, cols), values).to(dtype)))
        up = gate if alias == "same" else data.draw(layouts(_special(data.draw, torch.randn(rows, cols), values)
                                                            .to(dtype)))
    fn = swiglu if act == "silu" else (lambda g, u: geglu(g, u, "tanh" if act == "gelu_tanh" else "none"))
    out = fn(gate, up)
    assert_close(out, _glu_oracle(gate, up, act), dtype, glu_forward_reference(gate, up, act))
    # Gradients on finite inputs, through strided leaves.
    g = data.draw(layouts(torch.randn(rows, cols).to(dtype))).requires_grad_()
    u = data.draw(layouts(torch.randn(rows, cols).to(dtype))).requires_grad_()
    go = data.draw(layouts(torch.randn(rows, cols).to(dtype)))
    fn(g, u).backward(go)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    _glu_oracle(g64, u64, act).backward(go.double())
    assert_close(g.grad, g64.grad, dtype, name="grad gate")
    assert_close(u.grad, u64.grad, dtype, name="grad up")


def _rms_oracle(x, w, eps):
    x = x.double()
    return w.double() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rms_torch(x, w, eps):
    """transformers' LlamaRMSNorm in x's dtype (fp32 statistics)."""
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@bounded(10)
@given(data=st.data(), rows=st.sampled_from([0, 1, 4]), cols=st.sampled_from([1, 7, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), special=st.booleans())
def test_rms_norm_property(data, rows, cols, dtype, special, poison_empty):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))  # values replay with the example
    x = torch.randn(rows, cols)
    if special:  # inf / NaN poison their own row only; huge values must not overflow the fp32 sum of squares
        x = _special(data.draw, x, [INF, -INF, NAN, 1e15, 1e-30])
    x = data.draw(layouts(x.to(dtype))).requires_grad_(not special)
    w = data.draw(layouts(torch.rand(cols).to(dtype))).requires_grad_(not special)
    out = rms_norm(x, w, 1e-6)
    want = _rms_oracle(x.detach(), w.detach(), 1e-6)
    xt, wt = x.detach().clone().requires_grad_(not special), w.detach().clone().requires_grad_(not special)
    same = _rms_torch(xt, wt, 1e-6)
    assert_close(out, want, dtype, same)
    if not special:
        go = data.draw(layouts(torch.randn(rows, cols).to(dtype)))
        out.backward(go)
        same.backward(go)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        _rms_oracle(x64, w64, 1e-6).backward(go.double())
        # With one column d(out)/dx = w g eps / (x^2 + eps)^1.5 is ~1e-8 of the gradient's scale, what is
        # left of 1 - xhat^2 in fp32 (PyTorch's autograd takes another order): not a layout property.
        if cols > 1:
            assert_close(x.grad, x64.grad, dtype, xt.grad, name="grad x")
        assert_close(w.grad, w64.grad, dtype, wt.grad, name="grad weight")


@bounded(12)
@given(data=st.data(), n=st.sampled_from([0, 1, 5]), h=st.sampled_from([1, 8]), v=st.sampled_from([1, 3, 40]),
       use_bias=st.booleans(), masked=st.booleans(), ignored_poison=st.sampled_from([None, NAN, INF, -INF, 1e30]),
       reduction=st.sampled_from(["mean", "sum", "none"]), smoothing=st.sampled_from([0.0, 0.1]),
       chunk=st.sampled_from([None, 2]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_linear_cross_entropy_property(data, n, h, v, use_bias, masked, ignored_poison, reduction, smoothing, chunk,
                                       dtype, poison_empty):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))  # values replay with the example
    hidden = torch.randn(n, h)
    labels = torch.randint(0, v, (n,))
    ignored = torch.rand(n) < 0.4
    labels[ignored] = -100
    if ignored_poison is not None:
        hidden[ignored] = ignored_poison  # must contribute nothing, as in F.cross_entropy
    hidden = data.draw(layouts(hidden.to(dtype))).requires_grad_()
    weight = data.draw(layouts((torch.randn(v, h) * 0.5).to(dtype))).requires_grad_()
    bias = None
    if use_bias:
        b = torch.randn(v) * 0.1
        if masked and v > 1:  # a masked vocabulary: -inf bias on all but the labels' columns
            b[[j for j in range(v) if j not in labels.tolist()]] = -INF
        bias = data.draw(layouts(b.to(dtype)))
    labels = data.draw(layouts(labels))
    got = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction,
                                     label_smoothing=smoothing, chunk_size=chunk)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = linear_cross_entropy_reference(h64, w64, labels, bias=None if bias is None else bias.double(),
                                          reduction=reduction, label_smoothing=smoothing)
    # PyTorch's own: the logits in the input dtype, the loss in fp32 (transformers' ForCausalLMLoss).
    z = hidden.detach() @ weight.detach().T + (0 if bias is None else bias)
    same = F.cross_entropy(z.float(), labels, reduction=reduction, label_smoothing=smoothing)
    if reduction == "mean" and not (labels != -100).any():
        same = torch.zeros(())  # documented: a mean over no label is 0, not NaN
    assert_close(got, want, dtype, same, name="loss")
    if n and ignored_poison is None and torch.isfinite(want).all():
        go = torch.randn(got.shape)
        got.backward(go)
        want.backward(go.double())
        assert_close(hidden.grad, h64.grad, dtype, name="grad hidden")
        assert_close(weight.grad, w64.grad, dtype, name="grad weight")


def _torch_logprobs(z, targets, temperature):
    """PyTorch's own log-probs and entropy of logits z (log_softmax in fp32), with 0 * log 0 = 0 on masked
    (-inf) columns, so that they and their gradients stay finite where the float64 oracle's are."""
    logp = torch.log_softmax(z.float() / temperature, dim=-1)
    entropy = -(logp.exp() * torch.where(torch.isfinite(logp), logp, 0.0)).sum(-1)
    return logp.gather(-1, targets.view(-1, 1)).view(-1), entropy


@bounded(10)
@given(data=st.data(), n=st.sampled_from([0, 1, 5]), h=st.sampled_from([1, 8]), v=st.sampled_from([1, 3, 40]),
       masked=st.booleans(), huge=st.booleans(), temperature=st.sampled_from([1.0, 0.7]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_linear_logprobs_property(data, n, h, v, masked, huge, temperature, dtype, poison_empty):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))  # values replay with the example
    hidden = torch.randn(n, h) * (1e3 if huge else 1.0)
    targets = torch.randint(0, v, (n,))
    b = torch.randn(v) * 0.1
    if masked and v > 1:  # masked columns, one of them possibly a target (log-prob -inf)
        b[data.draw(st.lists(st.integers(0, v - 1), min_size=1, max_size=v - 1, unique=True))] = -INF
    hidden = data.draw(layouts(hidden.to(dtype))).requires_grad_()
    weight = data.draw(layouts((torch.randn(v, h) * 0.5).to(dtype))).requires_grad_()
    bias = data.draw(layouts(b.to(dtype)))
    targets = data.draw(layouts(targets))
    lp, ent = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want_lp, want_ent = linear_logprobs_reference(h64, w64, targets, bias=bias.double(), temperature=temperature)
    # PyTorch's own: the logits in the input dtype, log_softmax in fp32.
    z = hidden.detach() @ weight.detach().T + bias
    same_lp, same_ent = _torch_logprobs(z, targets, temperature)
    if huge:
        # Logits ~1e3: a log-prob or entropy near 0 (a near one-hot row gives ~1e-12 or ~1e-20) is
        # lse - u, two numbers ~1e3 apart by less than their fp32 spacing, so any fp32 formula resolves
        # it only to that spacing and a relative error says nothing there (a known limit of the math).
        # The bound is absolute: that spacing (over the finite logits), plus twice PyTorch's own error,
        # which holds its rounding of the logits to the input dtype (as the oracle rule allows).
        # In bf16 the logits themselves may be rounded to bf16 (as PyTorch's own path does): each one by
        # half its spacing, so lse - z_t by up to one bf16 spacing of the largest logit.
        finite_z = z.float()[torch.isfinite(z)]
        top = finite_z.abs().max().item() if finite_z.numel() else 0.0
        spacing = 8 * torch.finfo(torch.float32).eps * top
        if dtype != torch.float32:
            spacing += 2 * torch.finfo(dtype).eps * top
        spacing /= temperature
        for name, got, want, same in (("logp", lp, want_lp, same_lp), ("entropy", ent, want_ent, same_ent)):
            want = want.detach()
            assert torch.equal(torch.isfinite(got), torch.isfinite(want)), f"{name}: finite pattern differs"
            assert torch.equal(got[torch.isinf(want)].double(), want[torch.isinf(want)]), f"{name}: inf differs"
            both = torch.isfinite(want) & torch.isfinite(same)
            own = (same.double() - want)[both].abs().max().item() if both.any() else 0.0
            fin = torch.isfinite(want)
            torch.testing.assert_close(got.double()[fin], want[fin], rtol=0, atol=spacing + 2 * own,
                                       msg=lambda m, name=name: f"{name}: {m}")
    else:
        assert_close(lp, want_lp, dtype, same_lp, name="logp")
        assert_close(ent, want_ent, dtype, same_ent, name="entropy")
    keep = torch.isfinite(want_lp)
    if n and not huge:  # huge logits: the fp64 oracle's gradients are beyond what fp32 statistics resolve
        (lp[keep].sum() + 0.5 * ent.sum()).backward()
        (want_lp[keep].sum() + 0.5 * want_ent.sum()).backward()
        # PyTorch's own gradients (input dtype, log_softmax in fp32): a gradient that cancels (h=1, few
        # classes) is ill-conditioned, and PyTorch's own fp32 error there reaches the dtype's bound.
        ht, wt = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        own_lp, own_ent = _torch_logprobs(ht @ wt.T + bias, targets, temperature)
        (own_lp[keep].sum() + 0.5 * own_ent.sum()).backward()
        assert_close(hidden.grad, h64.grad, dtype, ht.grad, name="grad hidden", ill_conditioned=True)
        assert_close(weight.grad, w64.grad, dtype, wt.grad, name="grad weight", ill_conditioned=True)


@st.composite
def nf4_weights(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    rows, cols = draw(st.sampled_from([1, 3, 8])), draw(st.sampled_from([1, 7, 64]))
    blocksize, double_quant = draw(st.sampled_from([32, 64])), draw(st.booleans())
    w = torch.randn(rows, cols)
    w = _special(draw, w, [0.0, 1e15, -1e15])  # huge weights: their block's scale, not NaN
    packed, state = nf4_quantize(w, blocksize=blocksize, double_quant=double_quant)
    return packed, state


@st.composite
def strided_nf4(draw, packed, state):
    """packed and every quant-state tensor in random layouts (the quant_storage dtype too)."""
    storage = draw(st.sampled_from([torch.uint8, torch.float16, torch.float32]))
    p = packed
    if storage != torch.uint8 and packed.numel() % storage.itemsize == 0:
        p = packed.view(-1).view(storage).unsqueeze(1)  # a Params4bit stored as another dtype
    p = draw(layouts(p))
    if draw(st.booleans()):
        p = p.t()  # bitsandbytes' transposed (1, n) form
    s2 = state.state2
    nested = None if s2 is None else NF4State(draw(layouts(s2.absmax)), s2.shape, draw(layouts(s2.code)), s2.dtype,
                                              s2.blocksize, quant_type=s2.quant_type)
    offset = state.offset if state.offset is None else draw(layouts(state.offset.reshape(1)))
    s = NF4State(draw(layouts(state.absmax)), state.shape, draw(layouts(state.code)), state.dtype, state.blocksize,
                 offset=offset, state2=nested)
    return p, s


@bounded(10)
@given(data=st.data(), weights=nf4_weights(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_nf4_dequantize_property(data, weights, dtype, poison_empty):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))  # values replay with the example
    packed, state = weights
    want = nf4_dequantize(packed, state, dtype=dtype)
    with fastkern.runtime.force_reference():
        assert torch.equal(want, nf4_dequantize(packed, state, dtype=dtype))  # the kernel vs the reference
    p, s = data.draw(strided_nf4(packed, state))
    got = nf4_dequantize(p, s, dtype=dtype)
    assert torch.equal(got if p.shape[0] != 1 or p.dim() != 2 or p.shape == packed.shape else got.t(), want)


@bounded(8)
@given(data=st.data(), weights=nf4_weights(), m=st.sampled_from([0, 1, 3]), transpose=st.booleans(),
       special=st.booleans())
def test_nf4_matmul_property(data, weights, m, transpose, special, poison_empty):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))  # values replay with the example
    packed, state = weights
    n, k = state.shape
    w64 = nf4_dequantize(packed, state, dtype=torch.float32).double()
    x = torch.randn(m, n if transpose else k)
    if special:
        x = _special(data.draw, x, [INF, NAN, 1e10])  # 1e10 * 1e15 stays finite in fp32
    x = data.draw(layouts(x)).requires_grad_(not special)
    p, s = data.draw(strided_nf4(packed, state))
    out = nf4_matmul(x, p, s, transpose=transpose)
    want = x.detach().double() @ (w64 if transpose else w64.T)
    same = x.detach() @ (w64.float() if transpose else w64.float().T)
    assert_close(out, want, torch.float32, same)
    if not special and m:
        go = data.draw(layouts(torch.randn(out.shape)))
        out.backward(go)
        assert_close(x.grad, go.double() @ (w64.T if transpose else w64), torch.float32, name="grad x")


@bounded(8)
@given(data=st.data(), weights=nf4_weights(), m=st.sampled_from([0, 1, 3]), r=st.sampled_from([1, 4]),
       nf4=st.booleans(), use_bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_lora_linear_property(data, weights, m, r, nf4, use_bias, dtype, poison_empty):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))  # values replay with the example
    packed, state = weights
    n, k = state.shape
    w = nf4_dequantize(packed, state, dtype=dtype)
    x = data.draw(layouts(torch.randn(m, k).to(dtype))).requires_grad_()
    a = data.draw(layouts((torch.randn(r, k) * 0.3).to(dtype))).requires_grad_()
    b = data.draw(layouts((torch.randn(n, r) * 0.3).to(dtype))).requires_grad_()
    bias = data.draw(layouts(torch.randn(n).to(dtype))).requires_grad_() if use_bias else None
    if nf4:
        weight, quant = data.draw(strided_nf4(packed, state))
    else:
        weight, quant = data.draw(layouts(w)), None
    out = lora_linear(x, weight, a, b, 0.5, bias=bias, quant_state=quant)
    leaves = [x, a, b] + ([bias] if use_bias else [])
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    want = l64[0] @ w.double().T + 0.5 * (l64[0] @ l64[1].T) @ l64[2].T + (l64[3] if use_bias else 0.0)
    same = x.detach() @ w.T + 0.5 * (x.detach() @ a.detach().T) @ b.detach().T
    assert_close(out, want, dtype, same if bias is None else same + bias.detach())
    if m:
        go = data.draw(layouts(torch.randn(m, n).to(dtype)))
        out.backward(go)
        want.backward(go.double())
        # PyTorch's own gradients in the input dtype: with one or three rows a gradient can cancel to a
        # small value that no implementation resolves to the dtype's bound (ill-conditioned).
        lt = [t.detach().clone().requires_grad_() for t in leaves]
        own = lt[0] @ w.T + 0.5 * (lt[0] @ lt[1].T) @ lt[2].T + (lt[3] if use_bias else 0.0)
        own.backward(go)
        for name, t, t64, tt in zip(["x", "lora_A", "lora_B", "bias"], leaves, l64, lt):
            assert_close(t.grad, t64.grad, dtype, tt.grad, name=f"grad {name}", ill_conditioned=True)


@bounded(8)
@given(data=st.data(), lengths=st.lists(st.integers(0, 3), min_size=1, max_size=3), hk=st.integers(1, 2),
       group=st.integers(1, 2), d=st.sampled_from([4, 8]), window=st.sampled_from([None, 2]))
def test_document_attention_property(data, lengths, hk, group, d, window):
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))  # values replay with the example
    from fastkern.ops import document_attention
    from fastkern.reference.document_attention import document_attention_reference

    t = sum(lengths)
    bounds = [0] + [sum(lengths[: i + 1]) for i in range(len(lengths))]
    q = data.draw(layouts(torch.randn(t, hk * group, d))).requires_grad_()
    k = data.draw(layouts(torch.randn(t, hk, d))).requires_grad_()
    v = data.draw(layouts(torch.randn(t, hk, d))).requires_grad_()
    cu = data.draw(layouts(torch.tensor(bounds, dtype=torch.int32)))
    out = document_attention(q, k, v, cu, sliding_window=window)
    l64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = document_attention_reference(*l64, bounds, sliding_window=window)
    assert_close(out, want, torch.float32)
    if t:
        go = torch.randn(out.shape)
        out.backward(go)
        want.backward(go.double())
        for name, x, x64 in zip("qkv", (q, k, v), l64):
            assert_close(x.grad, x64.grad, torch.float32, name=f"grad {name}")


# ------------------------------------------------------------------------------------------------
# The same properties at real size on the GPU
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_size_strided_and_special(dtype):
    dev = "cuda"
    # NF4 at a Llama projection's size, packed bytes and state strided.
    w = torch.randn(4096, 4096, device=dev)
    packed, state = nf4_quantize(w)
    want = nf4_dequantize(packed, state, dtype=dtype)
    assert torch.equal(nf4_dequantize(relayout(packed, gaps=[2, 1], offset=7), _strided_state(state), dtype=dtype),
                       want)
    x = torch.randn(64, 4096, device=dev, dtype=dtype)
    assert_close(nf4_matmul(x, relayout(packed, gaps=[2, 1], offset=1), state), x.double() @ want.double().T, dtype,
                 x @ want.T)
    # Linear CE with a masked vocabulary and NaN under ignored labels, at a real vocabulary size.
    v, h = 32768, 1024
    hidden = torch.randn(512, h, device=dev, dtype=dtype)
    weight = (torch.randn(v, h, device=dev) * 0.02).to(dtype)
    labels = torch.randint(0, 1000, (512,), device=dev)
    labels[::7] = -100
    hidden[::7] = NAN
    bias = torch.zeros(v, device=dev, dtype=dtype)
    bias[1000:] = -INF
    got = fused_linear_cross_entropy(hidden, weight, labels, bias=bias)
    want = F.cross_entropy(hidden.double() @ weight.double().T + bias.double(), labels)
    assert torch.isfinite(got) and abs(got.item() - want.item()) <= 2e-2 * abs(want.item())
    lp, ent = fused_linear_logprobs(hidden[1::7], weight, labels[1::7], bias=bias, return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    # In-place rope: aliased arguments raise, the caller's gradients stay as they were.
    q = torch.randn(2, 2048, 32, 128, device=dev, dtype=dtype)
    cos, sin = (c.to(dev) for c in frequencies(torch.arange(2048)[None], 128))
    with pytest.raises(ValueError, match="share memory"):
        rope(q.transpose(1, 2), q.transpose(1, 2)[:, :8], cos, sin)
    qp = torch.randn(2, 2048, 32, 128, device=dev, dtype=dtype, requires_grad=True)
    kp = torch.randn(2, 2048, 8, 128, device=dev, dtype=dtype, requires_grad=True)
    q_rot, k_rot = rope((qp * 1).transpose(1, 2), (kp * 1).transpose(1, 2), cos, sin)
    gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    gq0, gk0 = gq.clone(), gk.clone()
    torch.autograd.backward((q_rot, k_rot), (gq, gk))
    assert torch.equal(gq, gq0) and torch.equal(gk, gk0)


@pytest.mark.gpu
def test_gpu_compile_fullgraph_inductor():
    cos, sin = (c.cuda() for c in frequencies(torch.arange(64)[None], 64))
    w_up = torch.randn(256, 512, device="cuda") * 0.05

    def step(x, norm_w):
        h = rms_norm(x, norm_w)
        q = h.view(1, 64, 4, 64).transpose(1, 2) * 1
        k = (h * 2).view(1, 64, 4, 64).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        gu = h @ w_up
        return (swiglu(gu[..., :256], gu[..., 256:], overwrite_inputs_in_backward=True).sum()
                + (q * k).sum())

    x = torch.randn(1, 64, 256, device="cuda", requires_grad=True)
    nw = torch.rand(256, device="cuda", requires_grad=True)
    out = torch.compile(step, fullgraph=True)(x, nw)
    out.backward()
    gx, gw = x.grad.clone(), nw.grad.clone()
    x.grad = nw.grad = None
    ref = step(x, nw)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gw, nw.grad, rtol=1e-4, atol=1e-3)
