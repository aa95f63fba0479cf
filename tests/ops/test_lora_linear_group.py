"""lora_linear_group (several LoRA projections of one input as one autograd node) vs a float64 oracle,
vs separate lora_linear calls, and its bookkeeping: held parameters, version checks, kept NF4 weights."""

import importlib
import pytest
import torch

from fastkern.ops import lora_linear
from fastkern.ops.lora_linear import reusing_dequantized_weights
from fastkern.ops.lora_linear_group import LoRALinearGroupFunction, lora_linear_group
from fastkern.ops.nf4 import flatten_state
from fastkern.ops.unused_output import output_unused, output_unused_taken
from fastkern.reference.lora_linear import dense_weight_reference, lora_linear_reference
from tests.oracle import assert_close
from tests.ops.test_lora_linear import DTYPES, _count_dequantizations, _inputs

# (N, r, bias, scaling) per projection: q/k/v-like widths (odd, unequal), different ranks and scalings.
GROUP = [(33, 4, True, 2.0), (9, 1, False, 0.5), (17, 8, True, 1.0)]


def _projections(m, k, dtype, nf4, seed, group=GROUP, device="cpu"):
    """(x, [(weight as a frozen Parameter, A, B, scaling, bias, quant_state)])."""
    x, projections = None, []
    for i, (n, r, bias, scaling) in enumerate(group):
        xi, w, a, b, bias_t, state = _inputs(m, n, k, r, dtype, nf4, bias, seed=seed + i, device=device)
        x = xi if x is None else x
        projections.append((torch.nn.Parameter(w, requires_grad=False), a, b, scaling, bias_t, state))
    return x, projections


def _leaves(x, projections, cast=None):
    def leaf(t):
        return None if t is None else (t.detach().to(cast) if cast else t.detach().clone()).requires_grad_()
    return leaf(x), [(w, leaf(a), leaf(b), s, leaf(bias), state) for w, a, b, s, bias, state in projections]


def _grads(x, projections):
    out = [x.grad]
    for _, a, b, _, bias, _ in projections:
        out += [a.grad, b.grad] + ([bias.grad] if bias is not None else [])
    return out


def _node(out):
    """The autograd node behind an output (each is returned as a view of the node's [M, N] result)."""
    return out.grad_fn.next_functions[0][0]


def _grad_outs(shapes, dtype, device="cpu"):
    g = torch.Generator().manual_seed(11)
    return [torch.randn(s, generator=g).to(device, dtype) for s in shapes]


def _reference(x, projections, dtype, grad_outs, cast):
    xl, pl = _leaves(x, projections, cast)
    outs = []
    for (w, a, b, s, bias, state), (_, _, _, _, _, _) in zip(pl, projections):
        quant = None if state is None else flatten_state("test", w, state, dtype)
        dense = dense_weight_reference(w, quant, dtype).to(cast)
        outs.append(lora_linear_reference(xl, dense, a, b, s, bias=bias))
    torch.autograd.backward(outs, [g.to(cast) for g in grad_outs])
    return outs, _grads(xl, pl)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k", [(5, 19), (37, 16), (12, 64)])
def test_matches_float64_oracle(m, k, dtype, nf4, poison_empty):
    x, projections = _projections(m, k, dtype, nf4, seed=m + k)
    _check_against_oracle(x, projections, dtype, GROUP)


def _check_against_oracle(x, projections, dtype, group):
    xl, pl = _leaves(x, projections)
    outs = lora_linear_group(xl, pl)
    grad_outs = _grad_outs([o.shape for o in outs], dtype, x.device)
    torch.autograd.backward(outs, grad_outs)
    oracle, oracle_grads = _reference(x, projections, dtype, grad_outs, torch.float64)
    same, same_grads = _reference(x, projections, dtype, grad_outs, dtype)
    for i, (got, o, s) in enumerate(zip(outs, oracle, same)):
        assert got.shape == (x.shape[0], group[i][0])
        assert_close(got, o, dtype, s, name=f"out {i}")
    for i, (got, o, s) in enumerate(zip(_grads(xl, pl), oracle_grads, same_grads)):
        assert_close(got, o, dtype, s, name=f"grad {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("widths", [(2048, 512, 512), (8192, 8192)], ids=["qkv", "gate_up"])
def test_llama_1b_groups_gpu(nf4, widths):
    # q/k/v and gate/up of the Llama-3.2-1B shape, 4096 tokens, bf16, r16.
    group = [(n, 16, False, 2.0) for n in widths]
    x, projections = _projections(4096, 2048, torch.bfloat16, nf4, seed=12, group=group, device="cuda")
    _check_against_oracle(x, projections, torch.bfloat16, group)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_same_as_separate_calls(nf4):
    # Same products in the same order: outputs and adapter gradients bit for bit; dX up to the order
    # of its summation (accumulated in place rather than added by autograd).
    x, projections = _projections(9, 24, torch.float32, nf4, seed=2)
    xl, pl = _leaves(x.view(3, 3, 24), projections)
    outs = lora_linear_group(xl, pl)
    grad_outs = _grad_outs([o.shape for o in outs], torch.float32)
    torch.autograd.backward(outs, grad_outs)
    xs, ps = _leaves(x.view(3, 3, 24), projections)
    sep = [lora_linear(xs, w, a, b, s, bias=bias, quant_state=st) for w, a, b, s, bias, st in ps]
    torch.autograd.backward(sep, grad_outs)
    for got, want in zip(outs, sep):
        assert got.shape == want.shape == (3, 3, got.shape[-1]) and torch.equal(got, want)
    got, want = _grads(xl, pl), _grads(xs, ps)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    for g, w_ in zip(got[1:], want[1:]):
        assert torch.equal(g, w_)


@pytest.mark.parametrize("trainable", ["x", "adapters", "one bias"])
def test_only_some_inputs_need_grad(trainable):
    x, projections = _projections(7, 16, torch.float32, False, seed=4)
    x = x.requires_grad_(trainable == "x")
    if trainable == "adapters":
        projections = [(w, a.requires_grad_(), b.requires_grad_(), s, bias, st) for w, a, b, s, bias, st in projections]
    elif trainable == "one bias":
        w, a, b, s, bias, st = projections[2]
        projections[2] = (w, a, b, s, bias.requires_grad_(), st)
    outs = lora_linear_group(x, projections)
    assert all(o.requires_grad for o in outs)  # one node: every output depends on what needs grad
    sum(o.sum() for o in outs).backward()
    if trainable == "x":
        assert x.grad is not None and projections[0][1].grad is None
    elif trainable == "adapters":
        assert x.grad is None and all(p[1].grad is not None and p[2].grad is not None for p in projections)
    else:
        assert projections[2][4].grad is not None and projections[0][4].grad is None


def test_without_grad_no_autograd_node():
    x, projections = _projections(6, 16, torch.float32, True, seed=5)
    with torch.no_grad():
        outs = lora_linear_group(x, projections)
    for o, (w, a, b, s, bias, st) in zip(outs, projections):
        assert o.grad_fn is None and torch.equal(o, lora_linear(x, w, a, b, s, bias=bias, quant_state=st))


@pytest.mark.parametrize("which", ["weight", "lora_A", "lora_B"])
def test_parameter_modified_before_backward_raises(which):
    x, projections = _projections(5, 16, torch.float32, True, seed=6)
    w, a, b, s, bias, st = projections[1]
    pa, pb = torch.nn.Parameter(a), torch.nn.Parameter(b)
    projections[1] = (w, pa, pb, s, bias, st)
    outs = lora_linear_group(x.requires_grad_(), projections)
    assert isinstance(_node(outs[0]), LoRALinearGroupFunction._backward_cls)
    with torch.no_grad():
        {"weight": w, "lora_A": pa, "lora_B": pb}[which].mul_(1)  # bumps the version only
    with pytest.raises(RuntimeError, match=f"modified by an inplace operation.*`{which}`"):
        sum(o.sum() for o in outs).backward()


def test_saved_tensor_hooks_see_only_activations():
    # As lora_linear: parameters held by reference, activations (x, each x @ A.T, cast copies) saved.
    x, projections = _projections(7, 16, torch.float32, True, seed=7)
    params = [(w, torch.nn.Parameter(a), torch.nn.Parameter(b), s, bias, st) for w, a, b, s, bias, st in projections]
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        cast_b = params[2][2] * 1.0  # one adapter passed as a tensor made by the step
        group = params[:2] + [params[2][:2] + (cast_b,) + params[2][3:]]
        outs = lora_linear_group(x.requires_grad_(), group)
    assert [tuple(t.shape) for t in packed] == [(7, 16), (7, 4), (7, 1), (7, 8), (17, 8)]
    sum(o.sum() for o in outs).backward()
    assert all(p[1].grad is not None for p in params)


def test_kept_nf4_weights_are_reused_and_released(monkeypatch):
    # Under reusing_dequantized_weights (a checkpoint's rerun) each NF4 projection dequantizes once, in
    # forward; the backward of the group uses those weights, bit for bit what it would dequantize.
    x, projections = _projections(13, 32, torch.bfloat16, True, seed=8)
    calls = _count_dequantizations(monkeypatch)

    def run(reuse):
        xl, pl = _leaves(x, projections)
        if reuse:
            with reusing_dequantized_weights():
                outs = lora_linear_group(xl * 1.5, pl)
        else:
            outs = lora_linear_group(xl * 1.5, pl)
        torch.autograd.backward([o.float().square().sum() for o in outs])
        return [o.detach() for o in outs] + _grads(xl, pl), outs

    fresh, _ = run(False)
    assert len(calls) == 6
    calls.clear()
    reused, outs = run(True)
    assert len(calls) == 3
    for got, want in zip(reused, fresh):
        assert torch.equal(got, want)
    assert all(record[7] is None for record in _node(outs[0]).records)  # released with the backward


def test_separate_calls_when_asked_for_an_unused_output_or_a_weight_to_save():
    x, projections = _projections(5, 16, torch.float32, False, seed=9)
    x.requires_grad_()
    with output_unused():
        outs = lora_linear_group(x, projections)
        assert output_unused_taken()  # by the first projection's own lora_linear call
    assert len({id(_node(o)) for o in outs}) == 3
    for o, (w, a, b, s, bias, st) in list(zip(outs, projections))[1:]:
        assert torch.equal(o, lora_linear(x, w, a, b, s, bias=bias, quant_state=st))
    plain = [(w.detach().clone(), *rest) for w, *rest in projections]
    outs = lora_linear_group(x, plain)
    assert len({id(_node(o)) for o in outs}) == 3  # a plain-tensor W is saved: separate nodes


def test_bad_inputs():
    x, projections = _projections(5, 16, torch.float32, False, seed=10)
    with pytest.raises(ValueError, match="empty"):
        lora_linear_group(x, [])
    w, a, b, s, bias, st = projections[1]
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear_group(x, [projections[0], (w, a, b[:-1], s, bias, st)])
    with pytest.raises(TypeError, match="dtype"):
        lora_linear_group(x, [projections[0], (w, a.to(torch.int32), b, s, bias, st)])


def test_compile_fullgraph_takes_the_custom_ops():
    # Under torch.compile the group is lora_linear's custom op per projection (what compile sees).
    x, projections = _projections(6, 32, torch.float32, True, seed=13)
    a = projections[0][1].requires_grad_()
    fn = torch.compile(lambda x: lora_linear_group(x, projections), fullgraph=True, backend="aot_eager")
    outs = fn(x)
    sum(o.sum() for o in outs).backward()
    a2 = a.detach().clone().requires_grad_()
    ref = lora_linear_group(x, [(projections[0][0], a2, *projections[0][2:])] + projections[1:])
    sum(o.sum() for o in ref).backward()
    for got, want in zip(outs, ref):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(a.grad, a2.grad)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_float32_adapters_give_what_an_autograd_cast_gives(nf4):
    # As lora_linear: float32 adapters under bf16 x are used in bf16 and get float32 gradients, the same
    # values as casting them with autograd before the call.
    x, projections = _projections(9, 32, torch.bfloat16, nf4, seed=31)
    g = torch.Generator().manual_seed(4)
    fp32 = [(w, torch.randn(a.shape, generator=g) / 6, torch.randn(b.shape, generator=g) / 2, s, bias, st)
            for w, a, b, s, bias, st in projections]
    runs = []
    for cast in (False, True):
        xl = x.clone().requires_grad_()
        leaves = [(w, torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone()), s, bias, st)
                  for w, a, b, s, bias, st in fp32]
        calls = [(w, a.bfloat16() if cast else a, b.bfloat16() if cast else b, s, bias, st)
                 for w, a, b, s, bias, st in leaves]
        outs = lora_linear_group(xl, calls)
        sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        runs.append([*outs, xl.grad] + [t.grad for _, a, b, *_ in leaves for t in (a, b)])
    for i, (got, want) in enumerate(zip(*runs)):
        assert got.dtype == want.dtype and torch.equal(got, want), i
    assert all(t.dtype == torch.float32 for t in runs[0][len(projections) + 1:])


def test_adapters_in_x_dtype_leave_no_cast_entry():
    # Adapters already in x's dtype are used as they are: no cached copy, nothing that would keep a
    # parameter alive after its model is gone.
    ops_module = importlib.import_module("fastkern.ops.lora_linear")
    x, projections = _projections(9, 32, torch.bfloat16, False, seed=33)
    leaves = [(w, torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone()), s, bias, st)
              for w, a, b, s, bias, st in projections]
    x = x.requires_grad_()
    sum(o.float().sum() for o in lora_linear_group(x, leaves)).backward()
    assert all(t.grad is not None for _, a, b, *_ in leaves for t in (a, b))
    assert not any(id(t) in ops_module._casts for _, a, b, *_ in leaves for t in (a, b))
