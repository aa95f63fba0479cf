"""Tiled MLP: same output and gradients as the untiled module, judged against float64; never more rows
than a tile reach the projections; composes with autograd (grad(), accumulation, frozen parameters,
checkpointing, autocast, dropout replay); PEFT LoRA and bitsandbytes NF4 bases inside."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

import fastkern
from fastkern.ops.tiled_mlp import ROW_MULTIPLE, tile_rows, tiled_mlp
from tests.oracle import assert_close

H, I = 16, 48


class GLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), as transformers' Llama MLP, optionally with fastkern's fused swiglu."""

    def __init__(self, hidden=H, inter=I, fused=False, dropout=0.0, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.fused, self.dropout = fused, nn.Dropout(dropout)
        self.rows_seen = []
        self.gate_proj.register_forward_hook(lambda m, args, out: self.rows_seen.append(args[0].numel() // args[0].shape[-1]))

    def forward(self, x):
        gate, up = self.gate_proj(x), self.up_proj(x)
        h = fastkern.ops.swiglu(gate, up, overwrite_inputs_in_backward=True) if self.fused else F.silu(gate) * up
        return self.down_proj(self.dropout(h))


def _make(dtype, seed=0, **kw):
    torch.manual_seed(seed)
    mlp64 = GLUMLP(**kw).double()
    for p in mlp64.parameters():  # larger weights than the default init, so every term matters
        nn.init.normal_(p, std=0.3)
    mlp = GLUMLP(**kw)
    mlp.load_state_dict(mlp64.state_dict())
    return mlp64, mlp.to(dtype)


def _grads(mlp, x, grad_out, fn):
    mlp.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = fn(mlp, x)
    y.backward(grad_out)
    return y.detach(), x.grad, {n: p.grad for n, p in mlp.named_parameters()}


def _check(dtype, shape, rows, **kw):
    mlp64, mlp = _make(dtype, **kw)
    x = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape[:-1] + (H,), dtype=torch.float64)
    ref = _grads(mlp64, x, g, lambda m, t: m(t))
    plain = _grads(mlp, x.to(dtype), g.to(dtype), lambda m, t: m(t))
    mlp.rows_seen.clear()
    got = _grads(mlp, x.to(dtype), g.to(dtype), lambda m, t: tiled_mlp(m, t, rows=rows))
    for name, a, r, p in (("out", got[0], ref[0], plain[0]), ("dx", got[1], ref[1], plain[1])):
        assert_close(a, r, dtype, p, name)
    for name in ref[2]:
        assert_close(got[2][name], ref[2][name], dtype, plain[2][name], name)
    return mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,rows", [((1, 37, H), 8), ((2, 13, H), 5), ((1, 5, H), 64), ((29, H), 7)],
                         ids=["odd-T", "batch2", "T-below-one-tile", "2d"])
def test_matches_float64_oracle(dtype, shape, rows):
    mlp = _check(dtype, shape, rows)
    n = shape[0] * shape[1] if len(shape) == 3 else shape[0]
    assert mlp.rows_seen and max(mlp.rows_seen) == min(rows, n)


@given(t=st.integers(1, 70), rows=st.integers(1, 40))
def test_any_length_and_tile_fp32(t, rows):
    _check(torch.float32, (1, t, H), rows, bias=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_swiglu_inside(dtype, poison_empty):
    mlp = _check(dtype, (1, 45, H), 16, fused=True)
    assert max(mlp.rows_seen) <= 16


def test_no_tile_larger_than_rows_in_forward_and_backward():
    _, mlp = _make(torch.float32)
    x = torch.randn(1, 100, H, requires_grad=True)
    tiled_mlp(mlp, x, rows=32).sum().backward()
    # forward: 4 tiles (32, 32, 32, 4); backward recomputes the same 4
    assert mlp.rows_seen == [32, 32, 32, 4] * 2


def test_grad_api_accumulation_and_frozen_parameters():
    _, mlp = _make(torch.float64)
    mlp.gate_proj.weight.requires_grad_(False)
    x = torch.randn(1, 21, H, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 21, H, dtype=torch.float64)
    params = [mlp.up_proj.weight, mlp.down_proj.weight]
    # torch.autograd.grad: gradients come back through the graph, nothing lands in .grad
    got = torch.autograd.grad(tiled_mlp(mlp, x, rows=4), [x, *params], g)
    want = torch.autograd.grad(mlp(x), [x, *params], g)
    assert all(p.grad is None for p in mlp.parameters())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # two micro-batches accumulate into .grad as untiled backward does; the frozen weight gets none
    tiled_mlp(mlp, x, rows=4).backward(g)
    tiled_mlp(mlp, x * 2, rows=6).backward(g)
    tiled = [p.grad.clone() for p in params]
    mlp.zero_grad(set_to_none=True)
    mlp(x).backward(g)
    mlp(x * 2).backward(g)
    assert mlp.gate_proj.weight.grad is None
    for a, p in zip(tiled, params):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-12)


def test_input_without_grad_and_no_grad_mode():
    _, mlp = _make(torch.float64)
    x = torch.randn(1, 19, H, dtype=torch.float64)
    y = tiled_mlp(mlp, x, rows=4)
    y.sum().backward()  # parameters only
    w = mlp.down_proj.weight.grad.clone()
    mlp.zero_grad()
    mlp(x).sum().backward()
    torch.testing.assert_close(w, mlp.down_proj.weight.grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        y = tiled_mlp(mlp, x, rows=4)
    assert y.grad_fn is None
    torch.testing.assert_close(y, mlp(x).detach(), rtol=1e-12, atol=1e-12)


def test_bf16_weight_grads_round_once():
    """Parameter gradients are summed over tiles in fp32 and rounded to bf16 once: as close to the fp64
    gradient as the untiled bf16 GEMM, even with many tiles."""
    mlp64, mlp = _make(torch.bfloat16)
    x = torch.randn(1, 400, H, dtype=torch.float64)
    g = torch.randn(1, 400, H, dtype=torch.float64)
    ref = _grads(mlp64, x, g, lambda m, t: m(t))
    plain = _grads(mlp, x.bfloat16(), g.bfloat16(), lambda m, t: m(t))
    got = _grads(mlp, x.bfloat16(), g.bfloat16(), lambda m, t: tiled_mlp(m, t, rows=8))
    for name in ref[2]:
        assert_close(got[2][name], ref[2][name], torch.bfloat16, plain[2][name], name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_under_gradient_checkpointing(reentrant):
    _, mlp = _make(torch.float64)
    x = torch.randn(2, 17, H, dtype=torch.float64, requires_grad=True)

    def block(t):
        return t + tiled_mlp(mlp, torch.tanh(t), rows=5)

    got = _grads(mlp, x, torch.ones_like(x), lambda m, t: checkpoint(block, t, use_reentrant=reentrant))
    want = _grads(mlp, x, torch.ones_like(x), lambda m, t: t + m(torch.tanh(t)))
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-12, atol=1e-12)


def test_autocast_is_replayed_in_backward():
    """Under autocast the recompute runs in autocast's dtype again. Weight gradients: each tile's bf16
    GEMM rounds its partial sum (the untiled GEMM rounds once); judged against float64 like the rest."""
    mlp64, mlp = _make(torch.float32)
    x = torch.randn(1, 23, H, dtype=torch.float64)
    g = torch.randn(1, 23, H, dtype=torch.float64)
    ref = _grads(mlp64, x, g, lambda m, t: m(t))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(mlp, x.float(), g.float(), lambda m, t: tiled_mlp(m, t, rows=6))
        want = _grads(mlp, x.float(), g.float(), lambda m, t: m(t))
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    # the same bf16 products per row
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert_close(got[1], ref[1], torch.bfloat16, want[1], "dx")
    for name in want[2]:
        assert got[2][name].dtype == torch.float32
        assert_close(got[2][name], ref[2][name], torch.bfloat16, want[2][name], name)


def test_dropout_masks_replayed():
    """Backward recomputes each tile with the RNG state of the forward: the gradient belongs to the
    dropout masks the forward output used, and the global RNG stream is left as the forward left it."""
    _, mlp = _make(torch.float64, dropout=0.5)
    mlp.train()
    x = torch.randn(1, 30, H, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(123)
    y = tiled_mlp(mlp, x, rows=7)
    after_forward = torch.get_rng_state()
    gx, gw = torch.autograd.grad(y, [x, mlp.down_proj.weight], torch.ones_like(y))
    assert torch.equal(torch.get_rng_state(), after_forward)
    torch.manual_seed(123)  # the same tiles, untiled math, with grad: same masks in the same order
    ys = [mlp(x[:, s:s + 7]) for s in range(0, 30, 7)]
    y_ref = torch.cat(ys, dim=1)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, [x, mlp.down_proj.weight], torch.ones_like(y_ref))
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)


def test_peft_lora_layers():
    peft = pytest.importorskip("peft")
    mlp64, mlp = _make(torch.float32)
    cfg = dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    lora = peft.get_peft_model(mlp, peft.LoraConfig(**cfg))
    lora64 = peft.get_peft_model(mlp64, peft.LoraConfig(**cfg))
    lora64.load_state_dict({k: v.double() for k, v in lora.state_dict().items()})
    x = torch.randn(1, 33, H, dtype=torch.float64)
    g = torch.randn(1, 33, H, dtype=torch.float64)
    ref = _grads(lora64, x, g, lambda m, t: m(t))
    plain = _grads(lora, x.float(), g.float(), lambda m, t: m(t))
    got = _grads(lora, x.float(), g.float(), lambda m, t: tiled_mlp(m, t, rows=8))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert len(trainable) == 6 and all("lora_" in n for n in trainable)
    assert_close(got[0], ref[0], torch.float32, plain[0], "out")
    assert_close(got[1], ref[1], torch.float32, plain[1], "dx")
    for name in trainable:
        assert_close(got[2][name], ref[2][name], torch.float32, plain[2][name], name)
    assert all(got[2][n] is None for n in got[2] if n not in trainable)


def test_nf4_bases_with_lora():
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    hidden, inter = 64, 128  # in_features multiples of bitsandbytes' blocksize (tests/bnb_reference.py)
    names = ("gate_proj", "up_proj", "down_proj")
    _, dense = _make(torch.float32, hidden=hidden, inter=inter)
    mlp = GLUMLP(hidden, inter)
    for name in names:
        src = getattr(dense, name)
        q = bnb.nn.Linear4bit(src.in_features, src.out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(src.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
        setattr(mlp, name, q.to("cpu"))
    mlp.rows_seen.clear()
    mlp.gate_proj.register_forward_hook(lambda m, args, out: mlp.rows_seen.append(args[0].shape[-2]))
    torch.manual_seed(5)
    lora = peft.get_peft_model(mlp, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(names),
                                                    init_lora_weights=False))
    lora.train()  # bitsandbytes repacks CPU weights for its eval kernel; training keeps the format
    x = torch.randn(1, 41, hidden, dtype=torch.float64)
    g = torch.randn(1, 41, hidden, dtype=torch.float64)
    plain = _grads(lora, x.float(), g.float(), lambda m, t: m(t))
    mlp.rows_seen.clear()
    got = _grads(lora, x.float(), g.float(), lambda m, t: tiled_mlp(m, t, rows=16))
    assert mlp.rows_seen and max(mlp.rows_seen) <= 16

    # float64 oracle: the same math on the dequantized NF4 weights, LoRA factors as float64 leaves
    layers = {n: getattr(mlp, n) for n in names}
    w64 = {n: bnb.functional.dequantize_4bit(l.base_layer.weight.data, l.base_layer.weight.quant_state).double()
           for n, l in layers.items()}
    a64 = {n: l.lora_A["default"].weight.detach().double().requires_grad_() for n, l in layers.items()}
    b64 = {n: l.lora_B["default"].weight.detach().double().requires_grad_() for n, l in layers.items()}

    def proj(n, z):
        return z @ w64[n].T + layers[n].scaling["default"] * (z @ a64[n].T) @ b64[n].T

    x64 = x.clone().requires_grad_()
    ref = proj("down_proj", F.silu(proj("gate_proj", x64)) * proj("up_proj", x64))
    ref.backward(g)
    assert_close(got[0], ref.detach(), torch.float32, plain[0], "out")
    assert_close(got[1], x64.grad, torch.float32, plain[1], "dx")
    for n in names:
        for kind, leaf in (("lora_A", a64[n]), ("lora_B", b64[n])):
            key = next(k for k in got[2] if f"{n}.{kind}" in k)
            assert_close(got[2][key], leaf.grad, torch.float32, plain[2][key], key)


def test_tile_rows_rule():
    # the fewest tiles within the budget, balanced, rounded up to ROW_MULTIPLE rows
    assert tile_rows(524288, 14336, 2) == 9216  # Llama-3.1-8B MLP, bf16: 57 tiles
    assert tile_rows(1 << 20, 8192, 2) == 16384  # Llama-3.2-1B: exactly 64 tiles
    assert tile_rows(10, 96, 4) == 10  # one tile, never more rows than tokens
    assert tile_rows(1000, 10, 1, budget_bytes=100) == 10  # below ROW_MULTIPLE: not rounded
    for n in (1, 63, 64, 65, 1000, 123457):
        rows = tile_rows(n, 1000, 2, budget_bytes=2000 * 100)
        assert 1 <= rows <= max(n, 1)
        tiles = -(-n // rows)
        assert rows <= 100 or rows % ROW_MULTIPLE == 0 or rows == n
        assert (tiles - 1) * rows < n  # no empty tile


def test_bad_input():
    _, mlp = _make(torch.float32)
    with pytest.raises(ValueError, match="at least 2 dims"):
        tiled_mlp(mlp, torch.randn(H))
    with pytest.raises(ValueError, match="rows"):
        tiled_mlp(mlp, torch.randn(3, H), rows=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_llama_shape_matches_oracle(dtype):
    """A Llama-1B-sized MLP (H2048, I8192) over 20K tokens in 3 tiles, fused swiglu inside, on the GPU."""
    torch.manual_seed(0)
    hidden, inter, t = 2048, 8192, 20000
    mlp64 = GLUMLP(hidden, inter, fused=True).double().cuda()
    for p in mlp64.parameters():
        nn.init.normal_(p, std=hidden ** -0.5)
    mlp = GLUMLP(hidden, inter, fused=True).cuda()
    mlp.load_state_dict(mlp64.state_dict())
    mlp = mlp.to(dtype)
    x = torch.randn(1, t, hidden, dtype=torch.float64, device="cuda")
    g = torch.randn(1, t, hidden, dtype=torch.float64, device="cuda")
    ref = _grads(mlp64, x, g, lambda m, z: m(z))
    plain = _grads(mlp, x.to(dtype), g.to(dtype), lambda m, z: m(z))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = _grads(mlp, x.to(dtype), g.to(dtype), lambda m, z: tiled_mlp(m, z, rows=7000))
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 8 * 7000 * inter * dtype.itemsize + 6 * t * hidden * dtype.itemsize, peak
    assert_close(got[0], ref[0], dtype, plain[0], "out")
    assert_close(got[1], ref[1], dtype, plain[1], "dx")
    for name in ref[2]:
        assert_close(got[2][name], ref[2][name], dtype, plain[2][name], name)


def test_strided_input_and_expanded_grad():
    """x a strided view (a slice of a wider buffer), grad_out an expanded tensor (from .sum())."""
    _, mlp = _make(torch.float64)
    base = torch.randn(1, 26, 2 * H, dtype=torch.float64)
    x = base[..., 1::2].requires_grad_()
    tiled_mlp(mlp, x, rows=6).sum().backward()
    got = (x.grad.clone(), mlp.up_proj.weight.grad.clone())
    x.grad = None
    mlp.zero_grad()
    mlp(x).sum().backward()
    torch.testing.assert_close(got[0], x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], mlp.up_proj.weight.grad, rtol=1e-12, atol=1e-12)
