"""fastkern.ops.rope against a float64 oracle and against transformers' apply_rotary_pos_emb.

The oracle is written here, independently of fastkern/reference/rope.py: transformers' formula
x * cos + rotate(x) * sin in float64 on the leading rotary_dim elements, the rest passed through.
q and k are always transposed views [B, H, T, D] of [B, T, H, D] tensors, as attention produces them.
"""

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastkern

# fastkern.ops.rope is the function; the module behind it:
rope_module = importlib.import_module("fastkern.ops.rope")
from fastkern.ops._common import needs_int64
from tests.oracle import assert_close
from tests.profiles import bounded

apply_rotary_pos_emb = pytest.importorskip("transformers.models.llama.modeling_llama").apply_rotary_pos_emb

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 80, 96, 128, 256]
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate_every_two(x):
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def oracle(x, cos, sin, interleaved=False):
    """float64 rotation of x [B, H, T, D] with cos/sin [B or 1, T, R]."""
    x, cos, sin = x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    r = cos.shape[-1]
    rot = rotate_every_two if interleaved else rotate_half
    return torch.cat([x[..., :r] * cos + rot(x[..., :r]) * sin, x[..., r:]], dim=-1)


def torch_same_dtype(x, cos, sin, interleaved=False):
    """The same formula evaluated by PyTorch in x's dtype (the error the kernel may be compared to)."""
    cos, sin = cos.to(x.dtype).unsqueeze(1), sin.to(x.dtype).unsqueeze(1)
    r = cos.shape[-1]
    rot = rotate_every_two if interleaved else rotate_half
    return torch.cat([x[..., :r] * cos + rot(x[..., :r]) * sin, x[..., r:]], dim=-1)


def frequencies(positions, rotary_dim, interleaved, base=10000.0):
    """cos/sin (float32) for integer positions [...]: half-split cat(f, f) or interleaved (f0 f0 f1 f1 ..)."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    f = positions.double()[..., None] * inv_freq
    emb = f.repeat_interleave(2, dim=-1) if interleaved else torch.cat([f, f], dim=-1)
    return emb.cos().float(), emb.sin().float()


def packed_positions(draw_lengths, total):
    """Positions restarting at 0 for each document; documents of the given lengths fill `total`."""
    pos, i = [], 0
    for n in draw_lengths:
        n = min(n, total - len(pos))
        pos.extend(range(n))
        if len(pos) == total:
            break
    pos.extend(range(total - len(pos)))
    return torch.tensor(pos)


def make_qk(b, hq, hk, t, d, dtype, requires_grad=False):
    """Leaves [B, T, H, D] and their transposed views [B, H, T, D]."""
    qp = torch.randn(b, t, hq, d, dtype=dtype).requires_grad_(requires_grad)
    kp = torch.randn(b, t, hk, d, dtype=dtype).requires_grad_(requires_grad)
    return qp, kp


@st.composite
def rope_cases(draw):
    ratio = draw(st.sampled_from([1, 2, 4, 8]))
    hk = draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from(HEAD_DIMS))
    interleaved = draw(st.booleans())
    # Phi-style partial rotary: a quarter or a half of the head, kept even.
    rotary_dim = draw(st.sampled_from([d, d // 2, d // 4]))
    rotary_dim -= rotary_dim % 2
    b = draw(st.integers(1, 2))
    t = draw(st.integers(1, 9))
    packed = draw(st.booleans())
    lengths = [draw(st.lists(st.integers(1, 5), min_size=1, max_size=6)) for _ in range(b)]
    return dict(b=b, hq=hk * ratio, hk=hk, d=d, t=t, rotary_dim=rotary_dim, interleaved=interleaved,
                packed=packed, lengths=lengths)


def positions_for(case):
    if case["packed"]:
        return torch.stack([packed_positions(ls, case["t"]) for ls in case["lengths"]])
    return torch.arange(case["t"]).expand(case["b"], -1)


@FIXTURE_OK
@given(case=rope_cases(), dtype=st.sampled_from(DTYPES), inplace=st.booleans(), table=st.booleans())
def test_rope_matches_oracle(poison_empty, case, dtype, inplace, table):
    position_ids = positions_for(case)
    qp, kp = make_qk(case["b"], case["hq"], case["hk"], case["t"], case["d"], dtype)
    q, k = qp.transpose(1, 2), kp.transpose(1, 2)
    q_in, k_in = q.clone(), k.clone()
    if table:
        cos, sin = frequencies(torch.arange(16), case["rotary_dim"], case["interleaved"])
        cos_tok, sin_tok = cos[position_ids], sin[position_ids]
        kwargs = dict(position_ids=position_ids)
    else:
        cos, sin = frequencies(position_ids, case["rotary_dim"], case["interleaved"])
        cos_tok, sin_tok = cos, sin
        kwargs = {}
    cos, sin = cos.to(dtype), sin.to(dtype)
    q_rot, k_rot = fastkern.ops.rope(q, k, cos, sin, interleaved=case["interleaved"], inplace=inplace, **kwargs)
    if inplace:
        assert q_rot.data_ptr() == qp.data_ptr() and k_rot.data_ptr() == kp.data_ptr()
    else:
        assert torch.equal(q, q_in) and torch.equal(k, k_in), "out-of-place call changed its inputs"
    cos_tok, sin_tok = cos_tok.to(dtype), sin_tok.to(dtype)
    for name, got, x in (("q", q_rot, q_in), ("k", k_rot, k_in)):
        want = oracle(x, cos_tok, sin_tok, case["interleaved"])
        assert_close(got, want, dtype, torch_same_dtype(x, cos_tok, sin_tok, case["interleaved"]), name=name)
        # Lanes past rotary_dim are passed through bit for bit.
        assert torch.equal(got[..., case["rotary_dim"]:], x[..., case["rotary_dim"]:]), name


@bounded(8)
@given(case=rope_cases(), dtype=st.sampled_from(DTYPES), inplace=st.booleans())
def test_rope_gradients(poison_empty, case, dtype, inplace):
    position_ids = positions_for(case)
    cos, sin = frequencies(position_ids, case["rotary_dim"], case["interleaved"])
    cos, sin = cos.to(dtype), sin.to(dtype)
    qp, kp = make_qk(case["b"], case["hq"], case["hk"], case["t"], case["d"], dtype, requires_grad=True)
    gq, gk = torch.randn(qp.transpose(1, 2).shape, dtype=dtype), torch.randn(kp.transpose(1, 2).shape, dtype=dtype)
    # In place needs non-leaf inputs (a projection output in real use); out of place takes the leaves' views.
    q, k = (qp * 1, kp * 1) if inplace else (qp, kp)
    q_rot, k_rot = fastkern.ops.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin,
                                     interleaved=case["interleaved"], inplace=inplace)
    ((q_rot * gq).sum() + (k_rot * gk).sum()).backward()

    q64 = qp.detach().double().requires_grad_()
    k64 = kp.detach().double().requires_grad_()
    loss = ((oracle(q64.transpose(1, 2), cos, sin, case["interleaved"]) * gq.double()).sum()
            + (oracle(k64.transpose(1, 2), cos, sin, case["interleaved"]) * gk.double()).sum())
    loss.backward()
    qs = qp.detach().clone().requires_grad_()
    ks = kp.detach().clone().requires_grad_()
    loss = ((torch_same_dtype(qs.transpose(1, 2), cos, sin, case["interleaved"]) * gq).sum()
            + (torch_same_dtype(ks.transpose(1, 2), cos, sin, case["interleaved"]) * gk).sum())
    loss.backward()
    assert_close(qp.grad, q64.grad, dtype, qs.grad, name="grad q")
    assert_close(kp.grad, k64.grad, dtype, ks.grad, name="grad k")


def _hf_rotary(head_dim, positions, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                         max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=dtype)
    return rotary(x, positions)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d", [(4, 4, 64), (4, 2, 80), (8, 2, 96), (8, 1, 128), (8, 1, 256)])
def test_rope_matches_transformers(poison_empty, dtype, hq, hk, d):
    """Same dtype, same cos/sin from transformers' rotary embedding, packed positions with 1-token documents."""
    position_ids = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    cos, sin = _hf_rotary(d, position_ids, dtype)
    qp, kp = make_qk(2, hq, hk, 9, d, dtype)
    q, k = qp.transpose(1, 2), kp.transpose(1, 2)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = fastkern.ops.rope(q.clone(), k.clone(), cos, sin, inplace=False)
    # The table path: one cos/sin row per position, picked per token.
    table_cos, table_sin = _hf_rotary(d, torch.arange(16)[None], dtype)
    tq, tk = fastkern.ops.rope(q.clone(), k.clone(), table_cos[0], table_sin[0], position_ids=position_ids)
    for got, want, x in ((got_q, want_q, q), (got_k, want_k, k), (tq, want_q, q), (tk, want_k, k)):
        if dtype == torch.float32:
            assert (got - want).abs().max().item() < 1e-5
        else:
            # transformers rounds q*cos and rot(q)*sin to the dtype before adding: compare both to fp64.
            ref = oracle(x, cos, sin)
            assert_close(got, ref, dtype, want, name="fastkern")


def test_rope_int64_offsets_path_matches(monkeypatch):
    """The INT64_OFFSETS kernel variant (taken past 2**31 elements) gives the same result."""
    position_ids = torch.arange(5)[None]
    cos, sin = frequencies(position_ids, 32, False)
    qp, kp = make_qk(1, 4, 2, 5, 32, torch.float32)
    want = fastkern.ops.rope(qp.transpose(1, 2), kp.transpose(1, 2), cos, sin, inplace=False)
    monkeypatch.setattr(rope_module, "reach", lambda *a: rope_module.INT32_MAX)
    got = fastkern.ops.rope(qp.transpose(1, 2), kp.transpose(1, 2), cos, sin, inplace=False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_reach_bounds_every_offset_a_launch_forms():
    """The launcher's int64 bound: last element plus slack steps of the largest stride of a dim longer
    than 1 (masked lanes run past the last token and head, never past the batch)."""
    from fastkern.ops._common import INT32_MAX

    for t in (torch.empty(2, 7, 3, 16).transpose(1, 2), torch.empty(5, 9)[:, ::2], torch.empty(1, 1, 4, 8)):
        for slack in (0, 32):
            last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
            widest = max(st for n, st in zip(t.shape, t.stride()) if n > 1)
            assert rope_module.reach(t.shape, t.stride(), slack) == last + slack * widest
    # A [1, 65536, 32, 128] projection seen as [1, 32, 65536, 128]: 2^28 elements, int32 is enough
    # (its 2^28 batch stride is never stepped).
    assert rope_module.reach((1, 32, 65536, 128), (2**28, 128, 4096, 1), 32) < INT32_MAX
    # ... and past 2^31 elements in q (the GPU test's size) the int64 variant is taken.
    assert rope_module.reach((1, 32, 2**19 + 1, 128), (2**31, 128, 4096, 1), 32) >= INT32_MAX


def test_inplace_is_tracked_by_autograd():
    """A tensor saved before the in-place rotation makes backward fail loudly instead of silently."""
    qp = torch.randn(1, 3, 2, 8, requires_grad=True)
    kp = torch.randn(1, 3, 1, 8, requires_grad=True)
    cos, sin = frequencies(torch.arange(3)[None], 8, False)
    q = (qp * 1).transpose(1, 2)
    saved = q.sin()  # sin saves its input q
    q_rot, _ = fastkern.ops.rope(q, (kp * 1).transpose(1, 2), cos, sin)
    assert q_rot._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (saved.sum() + q_rot.sum()).backward()


def test_expanded_gradient_is_not_written_in_place():
    """.sum() hands backward a zero-stride gradient; it must be copied, not rotated in place."""
    qp = torch.randn(2, 5, 4, 16, requires_grad=True)
    kp = torch.randn(2, 5, 2, 16, requires_grad=True)
    cos, sin = frequencies(torch.arange(5)[None], 16, False)
    q_rot, k_rot = fastkern.ops.rope((qp * 1).transpose(1, 2), (kp * 1).transpose(1, 2), cos, sin)
    (q_rot.sum() + 2 * k_rot.sum()).backward()
    q64 = qp.detach().double().requires_grad_()
    k64 = kp.detach().double().requires_grad_()
    (oracle(q64.transpose(1, 2), cos, sin).sum() + 2 * oracle(k64.transpose(1, 2), cos, sin).sum()).backward()
    assert_close(qp.grad, q64.grad, torch.float32, name="grad q")
    assert_close(kp.grad, k64.grad, torch.float32, name="grad k")


@pytest.mark.parametrize("inplace", [True, False])
def test_rope_compiles_fullgraph(inplace):
    cos, sin = frequencies(torch.arange(7)[None], 16, False)
    w = torch.randn(32, 3 * 32)

    def attention_like(x):
        qkv = x @ w
        q = qkv[..., :64].view(1, 7, 4, 16).transpose(1, 2)
        k = qkv[..., 64:].view(1, 7, 2, 16).transpose(1, 2)
        q, k = fastkern.ops.rope(q, k, cos, sin, inplace=inplace)
        return (q[:, ::2] * k).square().sum()

    x1 = torch.randn(1, 7, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    eager = attention_like(x1)
    eager.backward()
    compiled = torch.compile(attention_like, fullgraph=True)(x2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)


def test_zero_length_sequence():
    qp, kp = make_qk(1, 2, 1, 0, 8, torch.float32)
    cos, sin = torch.zeros(1, 0, 8), torch.zeros(1, 0, 8)
    q, k = fastkern.ops.rope(qp.transpose(1, 2), kp.transpose(1, 2), cos, sin, inplace=False)
    assert q.shape == (1, 2, 0, 8) and k.shape == (1, 1, 0, 8)


def test_bad_inputs_raise_clear_errors():
    qp, kp = make_qk(2, 4, 2, 5, 16, torch.float32)
    q, k = qp.transpose(1, 2), kp.transpose(1, 2)
    cos, sin = frequencies(torch.arange(5)[None], 16, False)
    rope = fastkern.ops.rope
    with pytest.raises(ValueError, match=r"cos`/`sin` must be \[B or 1, T, rotary_dim\]"):
        rope(q, k, cos[:, :4], sin[:, :4], inplace=False)  # T does not match
    with pytest.raises(ValueError, match="rotary_dim"):
        rope(q, k, cos, sin, rotary_dim=8, inplace=False)
    with pytest.raises(ValueError, match="must be even"):
        rope(q, k, cos[..., :15], sin[..., :15], inplace=False)
    with pytest.raises(ValueError, match="must be even"):
        rope(q, k, *frequencies(torch.arange(5)[None], 32, False), inplace=False)  # rotary_dim > head_dim
    with pytest.raises(ValueError, match="multiple of k's head count"):
        rope(q, make_qk(2, 3, 3, 5, 16, torch.float32)[1].transpose(1, 2), cos, sin, inplace=False)
    with pytest.raises(ValueError, match="same shape"):
        rope(q, k, cos, sin[..., :8], inplace=False)
    table_cos, table_sin = frequencies(torch.arange(6), 16, False)
    with pytest.raises(IndexError, match=r"span \[0, 6\] but the cos/sin table has 6 rows"):
        rope(q, k, table_cos, table_sin, position_ids=torch.tensor([[0, 1, 2, 3, 6]] * 2), inplace=False)
    with pytest.raises(IndexError, match="span"):
        rope(q, k, table_cos, table_sin, position_ids=torch.tensor([[0, -1, 2, 3, 4]] * 2), inplace=False)
    with pytest.raises(ValueError, match="table"):
        rope(q, k, cos, sin, position_ids=torch.zeros(2, 5, dtype=torch.long), inplace=False)
    with pytest.raises(ValueError, match="position_ids` must be"):
        rope(q, k, table_cos, table_sin, position_ids=torch.zeros(2, 4, dtype=torch.long), inplace=False)
    with pytest.raises(TypeError, match="`k` has dtype"):
        rope(q, k.half(), cos, sin, inplace=False)
    with pytest.raises(RuntimeError, match="leaf that requires grad"):
        rope(q.detach().requires_grad_(), k, cos, sin)


GPU_SHAPES = [(2, 32, 8, 1024, 128), (1, 28, 4, 2048, 128), (2, 16, 16, 513, 256), (1, 32, 8, 4097, 96)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,hq,hk,t,d", GPU_SHAPES)
@pytest.mark.parametrize("interleaved,partial", [(False, False), (True, False), (False, True)])
def test_rope_gpu_real_sizes(dtype, b, hq, hk, t, d, interleaved, partial):
    rotary_dim = d // 2 if partial else d
    lengths = torch.randint(1, 600, (64,)).tolist()
    position_ids = torch.stack([packed_positions(lengths, t) for _ in range(b)]).cuda()
    cos, sin = frequencies(position_ids.cpu(), rotary_dim, interleaved)
    cos, sin = cos.to("cuda", dtype), sin.to("cuda", dtype)
    qp = torch.randn(b, t, hq, d, device="cuda", dtype=dtype, requires_grad=True)
    kp = torch.randn(b, t, hk, d, device="cuda", dtype=dtype, requires_grad=True)
    gq = torch.randn(b, hq, t, d, device="cuda", dtype=dtype)
    gk = torch.randn(b, hk, t, d, device="cuda", dtype=dtype)
    q_rot, k_rot = fastkern.ops.rope((qp * 1).transpose(1, 2), (kp * 1).transpose(1, 2), cos, sin,
                                     interleaved=interleaved)
    want_q = oracle(qp.detach().transpose(1, 2), cos, sin, interleaved)
    want_k = oracle(kp.detach().transpose(1, 2), cos, sin, interleaved)
    assert_close(q_rot, want_q, dtype, torch_same_dtype(qp.detach().transpose(1, 2), cos, sin, interleaved), "q")
    assert_close(k_rot, want_k, dtype, torch_same_dtype(kp.detach().transpose(1, 2), cos, sin, interleaved), "k")
    ((q_rot * gq).sum() + (k_rot * gk).sum()).backward()
    # The gradient is the transpose rotation of the incoming gradient.
    grad_q = oracle(gq, cos, -sin, interleaved)
    grad_k = oracle(gk, cos, -sin, interleaved)
    assert_close(qp.grad.transpose(1, 2), grad_q, dtype, torch_same_dtype(gq, cos, -sin, interleaved), "grad q")
    assert_close(kp.grad.transpose(1, 2), grad_k, dtype, torch_same_dtype(gk, cos, -sin, interleaved), "grad k")


@pytest.mark.gpu
def test_rope_gpu_more_than_2_31_elements_in_q():
    """q with 2**31 + 2**22 bf16 elements (4.3 GB): offsets past int32 take the int64 kernel variant."""
    hq, hk, d = 32, 1, 128
    t = (2**31 + 2**22) // (hq * d)
    torch.manual_seed(0)
    qp = torch.randn(1, t, hq, d, device="cuda", dtype=torch.bfloat16)
    kp = torch.randn(1, t, hk, d, device="cuda", dtype=torch.bfloat16)
    cos, sin = frequencies(torch.arange(4096), d, False)
    cos, sin = cos.to("cuda", torch.bfloat16), sin.to("cuda", torch.bfloat16)
    position_ids = (torch.arange(t, device="cuda") % 4096)[None]
    check = torch.cat([torch.arange(0, 64), torch.arange(t - 2048, t)]).cuda()
    q_before, k_before = qp[:, check].clone(), kp[:, check].clone()
    assert needs_int64(qp.transpose(1, 2))
    fastkern.ops.rope(qp.transpose(1, 2), kp.transpose(1, 2), cos, sin, position_ids=position_ids)
    torch.cuda.synchronize()
    pos = position_ids[:, check]
    for got, before in ((qp[:, check], q_before), (kp[:, check], k_before)):
        want = oracle(before.transpose(1, 2), cos[pos], sin[pos])
        assert_close(got.transpose(1, 2), want, torch.bfloat16, name="tail rows")


@pytest.mark.parametrize("block_h,block_t", [(1, 1), (2, 2), (4, 4), (2, 8)])
@pytest.mark.parametrize("interleaved,table,heads_fastest", [(False, False, True), (True, True, False)])
def test_head_and_token_blocks_as_launched_on_gpu(poison_empty, block_h, block_t, interleaved, table, heads_fastest):
    """Several head blocks per token (the GPU launch config), several tokens per program, partially
    masked blocks of heads and of tokens, q then k, in both program orders."""
    qp, kp = make_qk(2, 6, 3, 5, 24, torch.bfloat16)
    q, k = qp.transpose(1, 2), kp.transpose(1, 2)
    positions = torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    cos, sin = frequencies(positions, 20, interleaved)
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    q_out[..., 20:], k_out[..., 20:] = q[..., 20:], k[..., 20:]
    if table:
        table_cos, table_sin = frequencies(torch.arange(5), 20, interleaved)
        rope_module._launch(q, k, q_out, k_out, table_cos, table_sin, positions, interleaved, False,
                            block_h=block_h, block_t=block_t, heads_fastest=heads_fastest)
    else:
        rope_module._launch(q, k, q_out, k_out, cos, sin, None, interleaved, False, block_h=block_h, block_t=block_t,
                            heads_fastest=heads_fastest)
    for got, x in ((q_out, q), (k_out, k)):
        assert_close(got, oracle(x, cos, sin, interleaved), torch.bfloat16, torch_same_dtype(x, cos, sin, interleaved))


def _ops_run_by(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_out_of_place_op_and_eager_function_are_one_definition(poison_empty):
    """inplace=False takes the eager Function made from the rope_qk definition; the custom op (what
    torch.compile traces), called directly, runs the same forward and backward, its backward as the
    custom op again. Same launches, so the same bits; both against the float64 oracle."""
    q = torch.randn(2, 5, 4, 16).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 5, 2, 16).transpose(1, 2).requires_grad_()
    cos, sin = frequencies(torch.arange(5)[None], 8, False)  # rotary_dim 8 < D: the tail is carried over
    gq, gk = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    eager = fastkern.ops.rope(q, k, cos, sin, inplace=False)
    assert type(eager[0].grad_fn).__name__ == "RopeQkFunctionBackward"
    eager_grads, op_grads = [], []
    eager_ops = _ops_run_by(lambda: eager_grads.extend(torch.autograd.grad(eager, (q, k), (gq, gk))))
    assert "fastkern.rope_qk" not in eager_ops, eager_ops
    via_op = torch.ops.fastkern.rope_qk(q, k, cos, sin, None, False, False)
    op_ops = _ops_run_by(lambda: op_grads.extend(torch.autograd.grad(via_op, (q, k), (gq, gk))))
    assert "fastkern.rope_qk" in op_ops, op_ops
    for got, want in zip((*via_op, *op_grads), (*eager, *eager_grads)):
        assert torch.equal(got, want)
    for name, got, x in (("q", eager[0], q), ("k", eager[1], k)):
        assert_close(got, oracle(x.detach(), cos, sin), torch.float32, name=name)
    assert_close(eager_grads[0], oracle(gq, cos, -sin), torch.float32, name="grad q")
    assert_close(eager_grads[1], oracle(gk, cos, -sin), torch.float32, name="grad k")


def test_inplace_on_projection_views_backward_is_one_launch(monkeypatch):
    """q, k as transposed views of whole projection outputs: backward is the kernel plus views and the
    allocation of the new gradients only (no CopySlices copies of the gradient)."""
    from torch.utils._python_dispatch import _disable_current_modes

    real = rope_module._launch
    launches = []

    def recorded(q, k, q_out, k_out, cos, sin, position_ids, interleaved, transpose, **kw):
        launches.append((transpose, q_out is q))  # transpose flag, in place
        with _disable_current_modes():  # the interpreter's own tensor copies are not the op's
            real(q, k, q_out, k_out, cos, sin, position_ids, interleaved, transpose, **kw)

    monkeypatch.setattr(rope_module, "_launch", recorded)
    qp = torch.randn(2, 5, 4, 16, requires_grad=True)
    kp = torch.randn(2, 5, 2, 16, requires_grad=True)
    cos, sin = frequencies(torch.arange(5)[None], 16, False)
    q_rot, k_rot = fastkern.ops.rope((qp * 1).transpose(1, 2), (kp * 1).transpose(1, 2), cos, sin)
    gq, gk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    want_q, want_k = oracle(gq, cos, -sin), oracle(gk, cos, -sin)
    grads = []
    ops = _ops_run_by(lambda: grads.extend(torch.autograd.grad((q_rot, k_rot), (qp, kp), (gq, gk))))
    # The rotation launches the kernel directly (no aten op); the rest only reshapes the gradient
    # (mul is the backward of the `* 1` that made q and k non-leaves; fill_ is the tests' NaN poisoning
    # of the new gradient buffers, off outside tests).
    assert set(ops) <= {"aten.view", "aten.permute", "aten.transpose", "aten.mul", "aten.empty_like", "aten.fill_"}, ops
    # One launch for q and k forward (in place), one backward into new gradients (never the caller's).
    assert launches == [(False, True), (True, False)]
    assert_close(grads[0].transpose(1, 2), want_q, torch.float32, name="grad q")
    assert_close(grads[1].transpose(1, 2), want_k, torch.float32, name="grad k")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_on_slices_of_fused_qkv(dtype):
    """q, k as slices of one fused qkv projection (Phi-3): the general in-place path, exact grads."""
    x = torch.randn(2, 5, 16, dtype=dtype)
    w = torch.randn(16, (4 + 2 + 2) * 8, dtype=dtype, requires_grad=True)
    cos, sin = frequencies(torch.arange(5)[None], 4, False)
    cos, sin = cos.to(dtype), sin.to(dtype)

    def forward(rotate):
        qkv = x @ w
        q = qkv[..., :32].view(2, 5, 4, 8).transpose(1, 2)
        k = qkv[..., 32:48].view(2, 5, 2, 8).transpose(1, 2)
        v = qkv[..., 48:].view(2, 5, 2, 8).transpose(1, 2)
        q, k = rotate(q, k)
        return (q[:, ::2] * k * v).sum() + q.square().sum()

    loss = forward(lambda q, k: fastkern.ops.rope(q, k, cos, sin, rotary_dim=4))
    (grad,) = torch.autograd.grad(loss, w)
    w64 = w.detach().double().requires_grad_()
    x64 = x.double()
    qkv = x64 @ w64
    q = oracle(qkv[..., :32].view(2, 5, 4, 8).transpose(1, 2), cos, sin)
    k = oracle(qkv[..., 32:48].view(2, 5, 2, 8).transpose(1, 2), cos, sin)
    v = qkv[..., 48:].view(2, 5, 2, 8).transpose(1, 2)
    ((q[:, ::2] * k * v).sum() + q.square().sum()).backward()
    if dtype == torch.float32:
        assert_close(grad, w64.grad, dtype, name="grad w")
    else:  # the bf16 matmuls around the op dominate the error; bound it at the bf16 tolerance
        err = ((grad.double() - w64.grad).norm() / w64.grad.norm()).item()
        assert err < 1e-2, err


def test_bf16_results_are_rounded_to_nearest_even():
    """Under the interpreter the kernel rounds its bf16 stores by hand, as the GPU's conversion does
    (the interpreter's own cast truncates: about half the elements would be one ulp low)."""
    qp, kp = make_qk(2, 4, 2, 9, 32, torch.float32)
    cos, sin = frequencies(torch.arange(9)[None], 32, False)
    q16, k16 = qp.to(torch.bfloat16), kp.to(torch.bfloat16)
    got_q, _ = fastkern.ops.rope(q16.transpose(1, 2), k16.transpose(1, 2), cos, sin, inplace=False)
    x = q16.transpose(1, 2).float()  # the same fp32 math, then PyTorch's round-to-nearest-even cast
    half = torch.cat([-x[..., 16:], x[..., :16]], -1)
    want = (x * cos[:, None] + half * sin[:, None]).to(torch.bfloat16)
    same = (got_q == want).float().mean().item()
    assert same > 0.99, f"only {same:.1%} of bf16 elements match round-to-nearest-even"
