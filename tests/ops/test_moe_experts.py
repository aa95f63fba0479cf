"""moe_experts: the grouped-GEMM kernels (interpreter on CPU) and the reference vs a float64 oracle.

The oracle is written independently of both: every pair's expert weights gathered with fancy indexing
and two einsums, differentiated by autograd in float64. PyTorch's own result in the tested dtype is the
same formula run in that dtype.
"""

import pytest
import torch
import torch.nn.functional as F

from fastkern import runtime
from fastkern.ops.moe_experts import (_routing, moe_experts, moe_experts_backward_op, moe_experts_forward_op)
from tests.oracle import assert_close


def oracle(x, ids, w, gate_up, down):
    """Pairs routed to id E (transformers' "no expert") meet an all-zero expert appended here."""
    n_experts, two_i, _ = gate_up.shape
    inter = two_i // 2
    gate_up = torch.cat([gate_up, gate_up.new_zeros(1, *gate_up.shape[1:])])
    down = torch.cat([down, down.new_zeros(1, *down.shape[1:])])
    g = torch.einsum("nkoh,nh->nko", gate_up[ids], x)
    h = F.silu(g[..., :inter]) * g[..., inter:]
    y = torch.einsum("nkhi,nki->nkh", down[ids], h)
    return (y * w[..., None].to(y.dtype)).sum(1)


def _strided(t, layout):
    if layout == "transposed":  # same values, last dim strided
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every other column of a wider buffer
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _case(n, k, e, hidden, inter, dtype, layout, w_dtype=None, seed=0, dropped=False, idle_expert=True):
    g = torch.Generator().manual_seed(seed)
    # Expert e - 1 gets no tokens when idle_expert: top-k drawn from the first e - 1 experts.
    pool = e - 1 if idle_expert else e
    ids = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(n)])
    if dropped:
        ids[::3, 0] = e  # routed to no expert
    x = torch.randn(n, hidden, generator=g).to(dtype)
    w = torch.rand(n, k, generator=g).to(w_dtype or dtype)
    gate_up = (torch.randn(e, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    down = (torch.randn(e, hidden, inter, generator=g) / inter**0.5).to(dtype)
    grad = torch.randn(n, hidden, generator=g).to(dtype)
    return [_strided(x, layout), ids, w, _strided(gate_up, layout), _strided(down, layout)], grad


def _run(fn, inputs, grad):
    # Fresh leaves with the inputs' own strides (clone() would make a sliced input contiguous).
    leaves = [t if i == 1 else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t).requires_grad_()
              for i, t in enumerate(inputs)]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [leaf.grad for i, leaf in enumerate(leaves) if i != 1]


def check(inputs, grad, dtype, fn=moe_experts, reference=oracle,
          names=("d hidden", "d weights", "d gate_up", "d down")):
    """fn vs reference in float64 on the same inputs; every input but the expert ids gets its gradient checked."""
    out, grads = _run(fn, inputs, grad)
    leaves64 = [t if i == 1 else t.double() for i, t in enumerate(inputs)]
    want, want_grads = _run(reference, leaves64, grad.double())
    same, same_grads = _run(reference, inputs, grad)
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out, want, dtype, same, "out")
    assert len(names) == len(grads)
    for name, got, ref, torch_same in zip(names, grads, want_grads, same_grads):
        # dtype, not the grad's: fp32 routing weights of a bf16 model get a gradient of bf16 precision.
        assert_close(got, ref, dtype, torch_same, name)
    assert grads[1].dtype == inputs[2].dtype


CASES = [
    # (n, k, e, hidden, inter, layout, w_dtype, dropped)
    (13, 3, 5, 40, 24, "contiguous", None, False),
    (7, 1, 3, 33, 17, "transposed", None, False),  # top-1, odd sizes
    (21, 2, 6, 48, 40, "sliced", torch.float32, True),  # fp32 routing weights (Mixtral), dropped pairs
]


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=["topk3", "top1-odd-transposed", "dropped-sliced"])
def test_matches_float64_oracle(case, dtype):
    assert runtime.path_for(torch.empty(0)) == "interpreter"
    n, k, e, hidden, inter, layout, w_dtype, dropped = case
    inputs, grad = _case(n, k, e, hidden, inter, dtype, layout, w_dtype, dropped=dropped)
    check(inputs, grad, dtype)


def test_reference_path_matches_oracle():
    inputs, grad = _case(9, 2, 4, 24, 20, torch.bfloat16, "transposed", dropped=True)
    with runtime.force_reference():
        check(inputs, grad, torch.bfloat16)


def test_kernels_and_reference_round_alike():
    # Same rounding points: the bf16 kernel path and the reference agree far closer than either to fp64.
    inputs, grad = _case(11, 2, 4, 32, 16, torch.bfloat16, "contiguous", seed=3)
    out, grads = _run(moe_experts, inputs, grad)
    with runtime.force_reference():
        ref, ref_grads = _run(moe_experts, inputs, grad)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_routing_layout():
    ids = torch.tensor([[2, 0], [2, 1], [0, 5], [2, 0]])  # expert 3 idle, id 5 routes to no expert (E = 4)
    pair_ids, block_expert, seg_start, counts = _routing(ids, 4, 4)
    assert counts.tolist() == [3, 1, 3, 0]
    assert seg_start.tolist() == [0, 4, 8, 12]
    assert block_expert.tolist() == [0, 1, 2] + [-1] * (len(block_expert) - 3)
    flat = ids.reshape(-1)
    for e in range(4):
        run = pair_ids[seg_start[e]: seg_start[e] + 4].tolist()
        got = [s for s in run if s >= 0]
        assert got == (flat == e).nonzero().squeeze(1).tolist()  # every pair of e, in pair order
        assert run[len(got):] == [-1] * (4 - len(got))  # then padding
    assert 5 not in pair_ids.tolist()  # pair s = 5 (token 2, id 5) is in no expert's run
    assert (pair_ids >= 0).sum() == 7


def test_frozen_experts_and_no_grad_inputs():
    inputs, grad = _case(6, 2, 3, 16, 16, torch.float32, "contiguous")
    x = inputs[0].clone().requires_grad_()
    out = moe_experts(x, inputs[1], inputs[2], inputs[3], inputs[4])
    out.backward(grad)
    x64 = inputs[0].double().requires_grad_()
    oracle(x64, inputs[1], inputs[2].double(), inputs[3].double(), inputs[4].double()).backward(grad.double())
    assert_close(x.grad, x64.grad, torch.float32, name="d hidden")


def test_empty_batch():
    x = torch.randn(0, 16, requires_grad=True)
    out = moe_experts(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.randn(3, 8, 16),
                      torch.randn(3, 16, 4))
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16)


def test_custom_ops_and_compile():
    inputs, grad = _case(5, 2, 3, 16, 16, torch.float32, "contiguous")
    x, ids, w, gate_up, down = inputs
    torch.library.opcheck(moe_experts_forward_op, (x, ids, w, gate_up, down))
    _, gu = moe_experts_forward_op(x, ids, w, gate_up, down)
    torch.library.opcheck(moe_experts_backward_op, (grad, x, ids, w, gate_up, down, gu))

    def f(x, w, gate_up, down):
        return (moe_experts(x, ids, w, gate_up, down) * grad).sum()

    leaves = [t.clone().requires_grad_() for t in (x, w, gate_up, down)]
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, gate_up, down)]
    ref = f(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


class TestBadInput:
    def test_shapes(self):
        x = torch.randn(4, 16)
        ids, w = torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
        with pytest.raises(ValueError, match="gate_up"):
            moe_experts(x, ids, w, torch.randn(3, 9, 16), torch.randn(3, 16, 4))
        with pytest.raises(ValueError, match="top_k_weights"):
            moe_experts(x, ids, torch.rand(4, 3), torch.randn(3, 8, 16), torch.randn(3, 16, 4))

    def test_dtypes(self):
        x = torch.randn(4, 16)
        ids, w = torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
        with pytest.raises(TypeError, match="gate_up"):
            moe_experts(x, ids, w, torch.randn(3, 8, 16, dtype=torch.bfloat16), torch.randn(3, 16, 4))
        with pytest.raises(TypeError, match="top_k_index"):
            moe_experts(x, w, w, torch.randn(3, 8, 16), torch.randn(3, 16, 4))


@pytest.mark.gpu
def test_gpu_mixtral_sized_weights_use_int64_offsets():
    # gate_up of 8 x 28672 x 4096 (0.94e9 elements) and 4096 tokens x top-2: offsets near 2**31 in bf16.
    dev = "cuda"
    n, k, e, hidden, inter = 4096, 2, 8, 4096, 14336
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, hidden, device=dev, generator=g).bfloat16()
    ids = torch.randint(0, e, (n, k), device=dev, generator=g)
    w = torch.rand(n, k, device=dev, generator=g).bfloat16()
    gate_up = (torch.randn(e, 2 * inter, hidden, device=dev, generator=g) / hidden**0.5).bfloat16()
    down = (torch.randn(e, hidden, inter, device=dev, generator=g) / inter**0.5).bfloat16()
    out = moe_experts(x, ids, w, gate_up, down)
    rows = torch.arange(0, n, 97, device=dev)
    want = torch.zeros(len(rows), hidden, dtype=torch.float64, device=dev)
    for i, t in enumerate(rows.tolist()):  # one expert's weights in float64 at a time
        for j in range(k):
            ex = int(ids[t, j])
            gu = gate_up[ex].double() @ x[t].double()
            h = F.silu(gu[:inter]) * gu[inter:]
            want[i] += w[t, j].double() * (down[ex].double() @ h)
    assert_close(out[rows], want, torch.bfloat16)


# gpt-oss's experts: weights stored transposed (gate_up [E, H, 2I], down [E, I, H], applied as x @ W), gate
# and up columns interleaved, biases on both projections, clamped SwiGLU. The oracle below is written in
# that storage and that formula (transformers' GptOssExperts); the op gets the weights as transposed views.
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0
GATED_NAMES = ("d hidden", "d weights", "d gate_up", "d gate_up_bias", "d down", "d down_bias")


def gated_oracle(x, ids, w, gate_up, gate_up_bias, down, down_bias, *, interleaved=True, clamped=True,
                 alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT):
    """x @ W storage: gate_up [E, H, 2I], down [E, I, H]; pairs routed to id E meet an all-zero expert."""
    def padded(t):
        return torch.cat([t, t.new_zeros(1, *t.shape[1:])])

    gate_up, gate_up_bias, down, down_bias = map(padded, (gate_up, gate_up_bias, down, down_bias))
    gu = torch.einsum("nh,nkhj->nkj", x, gate_up[ids]) + gate_up_bias[ids]
    inter = gu.shape[-1] // 2
    gate, up = (gu[..., ::2], gu[..., 1::2]) if interleaved else (gu[..., :inter], gu[..., inter:])
    if clamped:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * alpha))
    else:
        h = F.silu(gate) * up
    y = torch.einsum("nki,nkih->nkh", h, down[ids]) + down_bias[ids]
    return (y * w[..., None].to(y.dtype)).sum(1)


def gated_op(x, ids, w, gate_up, gate_up_bias, down, down_bias, *, interleaved=True, clamped=True,
             alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT):
    act = dict(activation="clamped_swiglu", alpha=alpha, limit=limit) if clamped else {}
    return moe_experts(x, ids, w, gate_up.transpose(1, 2), down.transpose(1, 2), gate_up_bias, down_bias,
                       interleaved=interleaved, **act)


def _gated_case(n, k, e, hidden, inter, dtype, layout, scale=1.0, seed=0, dropped=False):
    """Inputs (x, ids, w, gate_up [E, H, 2I], gate_up_bias, down [E, I, H], down_bias); ``scale`` multiplies
    x so that a share of the pre-activations passes the clamp limit."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(n)])  # expert e - 1 idle
    if dropped:
        ids[::3, 0] = e
    x = (scale * torch.randn(n, hidden, generator=g)).to(dtype)
    w = torch.rand(n, k, generator=g).to(dtype)
    gate_up = (torch.randn(e, hidden, 2 * inter, generator=g) / hidden**0.5).to(dtype)
    gate_up_bias = (0.5 * torch.randn(e, 2 * inter, generator=g)).to(dtype)
    down = (torch.randn(e, inter, hidden, generator=g) / inter**0.5).to(dtype)
    down_bias = (0.5 * torch.randn(e, hidden, generator=g)).to(dtype)
    grad = torch.randn(n, hidden, generator=g).to(dtype)
    inputs = [x, ids, w, gate_up, gate_up_bias, down, down_bias]
    return [t if i == 1 else _strided(t, layout) for i, t in enumerate(inputs)], grad


def _with(fn, **kw):
    return lambda *args: fn(*args, **kw)


GATED_CASES = [
    # (n, k, e, hidden, inter, layout, scale, limit, interleaved, clamped, dropped)
    (13, 3, 5, 40, 24, "contiguous", 6.0, GPT_OSS_LIMIT, True, True, False),  # gpt-oss constants, clamps bind
    (7, 1, 3, 33, 17, "transposed", 1.0, 0.6, True, True, True),  # top-1, odd sizes, a tight limit
    (21, 2, 6, 48, 40, "sliced", 1.0, 1.0, True, True, True),  # strided everything, dropped pairs
    (11, 2, 4, 32, 16, "contiguous", 1.0, None, False, False, False),  # silu, concatenated, with biases
    (9, 2, 4, 24, 20, "contiguous", 1.0, None, True, False, True),  # silu, interleaved, with biases
]
GATED_IDS = ["gpt-oss-limit7", "top1-odd-tight", "sliced-dropped", "silu-concat-bias", "silu-interleaved-bias"]


def _gated_fns(limit, interleaved, clamped):
    kw = dict(interleaved=interleaved, clamped=clamped, **({"limit": limit} if clamped else {}))
    return _with(gated_op, **kw), _with(gated_oracle, **kw)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", GATED_CASES, ids=GATED_IDS)
def test_gated_matches_float64_oracle(case, dtype):
    assert runtime.path_for(torch.empty(0)) == "interpreter"
    n, k, e, hidden, inter, layout, scale, limit, interleaved, clamped, dropped = case
    inputs, grad = _gated_case(n, k, e, hidden, inter, dtype, layout, scale, dropped=dropped)
    if clamped:  # the case is meant to exercise the clamps: some gate and some up values pass the limit
        gu = torch.einsum("nh,ehj->nej", inputs[0].double(), inputs[3].double()) + inputs[4].double()
        assert (gu[..., ::2] > limit).any() and (gu[..., 1::2].abs() > limit).any()
    fn, reference = _gated_fns(limit, interleaved, clamped)
    check(inputs, grad, dtype, fn, reference, GATED_NAMES)


def test_gated_reference_path_matches_oracle():
    inputs, grad = _gated_case(9, 2, 4, 24, 20, torch.bfloat16, "transposed", dropped=True)
    with runtime.force_reference():
        check(inputs, grad, torch.bfloat16, *_gated_fns(0.8, True, True), GATED_NAMES)


def test_gated_kernels_and_reference_round_alike():
    inputs, grad = _gated_case(11, 2, 4, 32, 16, torch.bfloat16, "contiguous", seed=3)
    fn = _gated_fns(0.8, True, True)[0]
    out, grads = _run(fn, inputs, grad)
    with runtime.force_reference():
        ref, ref_grads = _run(fn, inputs, grad)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("trainable", ["biases", "weights"])
def test_gated_frozen_weights_or_biases(trainable):
    # Weight gradients skipped with the bias gradients wanted (the kernel's sum-only launch), and the reverse.
    inputs, grad = _gated_case(10, 2, 4, 24, 16, torch.float32, "contiguous", scale=2.0)
    fn, reference = _gated_fns(1.0, True, True)
    train = (4, 6) if trainable == "biases" else (3, 5)
    leaves = [t.clone().requires_grad_(i in (0, *train)) if i != 1 else t for i, t in enumerate(inputs)]
    fn(*leaves).backward(grad)
    leaves64 = [t.double().requires_grad_(i in (0, *train)) if i != 1 else t for i, t in enumerate(inputs)]
    reference(*leaves64).backward(grad.double())
    for i in (0, *train):
        assert_close(leaves[i].grad, leaves64[i].grad, torch.float32, name=GATED_NAMES[i - (i > 1)])
    for i in (2, 3, 4, 5, 6):
        if i not in train:
            assert leaves[i].grad is None


def test_gated_custom_ops_and_compile():
    inputs, grad = _gated_case(5, 2, 3, 16, 16, torch.float32, "contiguous", scale=3.0)
    x, ids, w, gate_up, gub, down, db = inputs
    act = dict(interleaved=True, clamped=True, alpha=GPT_OSS_ALPHA, limit=1.0)
    args = (x, ids, w, gate_up.transpose(1, 2), down.transpose(1, 2), gub, db)
    torch.library.opcheck(moe_experts_forward_op, args, act)
    _, gu = moe_experts_forward_op(*args, **act)
    torch.library.opcheck(moe_experts_backward_op, (grad, *args[:5], gu, gub, db), act)
    fn = _gated_fns(1.0, True, True)[0]

    def f(x, w, gate_up, gub, down, db):
        return (fn(x, ids, w, gate_up, gub, down, db) * grad).sum()

    leaves = [t.clone().requires_grad_() for t in (x, w, gate_up, gub, down, db)]
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, gate_up, gub, down, db)]
    ref = f(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


class TestBadGatedInput:
    x, ids, w = torch.randn(4, 16), torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    gate_up, down = torch.randn(3, 8, 16), torch.randn(3, 16, 4)

    def test_bias_shape_and_dtype(self):
        with pytest.raises(ValueError, match="gate_up_bias"):
            moe_experts(self.x, self.ids, self.w, self.gate_up, self.down, torch.randn(3, 4))
        with pytest.raises(ValueError, match="down_bias"):
            moe_experts(self.x, self.ids, self.w, self.gate_up, self.down, None, torch.randn(3, 8))
        with pytest.raises(TypeError, match="down_bias"):
            moe_experts(self.x, self.ids, self.w, self.gate_up, self.down, None, torch.randn(3, 16).double())

    def test_activation(self):
        with pytest.raises(ValueError, match="not one of"):
            moe_experts(self.x, self.ids, self.w, self.gate_up, self.down, activation="gelu")
        with pytest.raises(ValueError, match="silu takes neither"):
            moe_experts(self.x, self.ids, self.w, self.gate_up, self.down, limit=7.0)
        with pytest.raises(ValueError, match="needs alpha and limit"):
            moe_experts(self.x, self.ids, self.w, self.gate_up, self.down, activation="clamped_swiglu", alpha=1.7)
        with pytest.raises(ValueError, match="limit >= 0"):
            moe_experts(self.x, self.ids, self.w, self.gate_up, self.down, activation="clamped_swiglu", alpha=1.7,
                        limit=-1.0)
        with pytest.raises(TypeError, match="interleaved"):
            moe_experts(self.x, self.ids, self.w, self.gate_up, self.down, interleaved="yes")
