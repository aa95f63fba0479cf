"""The test oracle.

A result passes when, on the positions where the float64 oracle is finite, its relative error norm
||x - oracle|| / ||oracle|| is below the dtype's bound AND at most 2x the error of the same
computation done by PyTorch in the input dtype, plus a small floor; and it is NaN/inf exactly where
the oracle is. NaN never passes.
"""

import torch

REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 4e-4, torch.float64: 1e-13}


def rel_err(x: torch.Tensor, oracle: torch.Tensor, tiny: float = 0.0) -> float:
    """||x - oracle|| / ||oracle|| over the oracle's finite positions; the absolute ||x - oracle|| when
    ||oracle|| <= tiny * sqrt(n).

    ``tiny`` is the smallest normal number of the dtype under test. An all-zero oracle (a gradient
    that is exactly 0) and an oracle below what that dtype can represent (a float64 result of 1e-219
    for an fp32 op, which every fp32 implementation, PyTorch's included, returns as 0) are both
    judged by absolute error instead of a relative error of 1 or of 1e30.
    """
    x, oracle = x.detach().double().cpu(), oracle.detach().double().cpu()
    finite = torch.isfinite(oracle)
    num = (x[finite] - oracle[finite]).norm().item()
    den = oracle[finite].norm().item()
    if den <= tiny * max(int(finite.sum()), 1) ** 0.5:
        return num
    return num / den


def assert_close(actual: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype, torch_same_dtype=None, name="out",
                 model_level=False, ill_conditioned=False, floor=None):
    """`actual` vs the float64 `oracle`; `torch_same_dtype` is PyTorch's own result in `dtype`.

    model_level: errors of a whole model compound past the per-op bound, so only the relative
    criterion (2x PyTorch's own error in the same dtype, plus the floor) applies.
    floor: the small absolute allowance added to 2x PyTorch's error (default: FLOOR of the dtype).
    ill_conditioned: a result that cancels (a gradient summing terms of both signs to a small value,
    e.g. one hidden unit against three classes) can lose more than the dtype's bound in any
    implementation; it passes under the dtype's bound OR under 2x PyTorch's own error plus the floor.
    """
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    a, o = actual.detach().double().cpu(), oracle.detach().double().cpu()
    finite = torch.isfinite(o)
    bad_nonfinite = ~torch.isfinite(a) & finite
    assert not bad_nonfinite.any(), f"{name}: {int(bad_nonfinite.sum())} non-finite values where the oracle is finite"
    assert torch.equal(torch.isnan(a[~finite]), torch.isnan(o[~finite])), f"{name}: NaN pattern differs from oracle"
    assert torch.equal(a[torch.isinf(o)], o[torch.isinf(o)]), f"{name}: inf values differ from oracle"
    tiny = torch.finfo(dtype).tiny
    err = rel_err(a, o, tiny)
    bound = REL_TOL[dtype]
    if torch_same_dtype is not None:
        relative = 2 * rel_err(torch_same_dtype, o, tiny) + (FLOOR[dtype] if floor is None else floor)
        if model_level:
            bound = relative
        elif ill_conditioned:
            bound = max(bound, relative)
        else:
            bound = min(bound, relative)
    elif model_level or ill_conditioned:
        raise ValueError("model_level and ill_conditioned comparisons need PyTorch's own same-dtype result")
    assert err <= bound, f"{name}: relative error {err:.3e} > bound {bound:.3e} ({dtype})"


def assert_compiled_matches_eager(f, *leaves):
    """torch.compile(f, fullgraph=True) (aot_eager) gives the same value and leaf gradients as eager f."""
    import torch

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    out.backward()
    grads = [leaf.grad.clone() for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    ref = f(*leaves)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad)


def assert_same_fp32_run(got, want, *, loss_rtol=1e-6, grad_rtol=1e-4):
    """Model-level fp32 parity of two (logits, loss, {parameter name: grad}) triples: patched vs unpatched."""
    import torch

    (logits1, loss1, grads1), (logits0, loss0, grads0) = got, want
    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss1, loss0, rtol=loss_rtol, atol=1e-6)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=grad_rtol, atol=1e-6, msg=name)


RULE_FACTOR = 1.05
RULE_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 4e-4}


def assert_within_reference_rule(patched: dict, unpatched: dict, reference: dict, dtype: torch.dtype,
                                 factor: float = RULE_FACTOR, floor: float | None = None):
    """Model-level accuracy rule: for every key (loss trajectory, gradients, weight updates, ...), the
    patched run's relative deviation from the high-precision reference is at most ``factor`` times the
    unpatched run's plus a small floor. Both runs must be finite where the reference is."""
    floor = RULE_FLOOR[dtype] if floor is None else floor
    assert patched.keys() == unpatched.keys() == reference.keys()
    for key in reference:
        ref = reference[key].detach().double().cpu()
        for label, run in (("patched", patched), ("unpatched", unpatched)):
            got = run[key].detach().double().cpu()
            assert got.shape == ref.shape, f"{key}: {label} shape {tuple(got.shape)} != {tuple(ref.shape)}"
            assert torch.isfinite(got[torch.isfinite(ref)]).all(), f"{key}: {label} run is not finite"
        assert ref.norm() > 0, f"{key}: the reference is all zero, the comparison would be empty"
        dev_p = rel_err(patched[key], ref)
        dev_u = rel_err(unpatched[key], ref)
        bound = factor * dev_u + floor
        assert dev_p <= bound, (f"{key}: patched deviates {dev_p:.3e} from the reference, more than "
                                f"{factor} x unpatched {dev_u:.3e} + {floor:.0e} = {bound:.3e}")


def reference_rule_batches(vocab: int, steps: int, seed: int = 11):
    """`steps` (ids, labels) batches of 2 x 13 tokens, a masked 3-token prefix in row 0 (a prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 13), generator=g)
        labels = ids.clone()
        labels[0, :3] = -100
        out.append((ids, labels))
    return out


def train_for_reference_rule(model, batches, lr: float = 0.05) -> dict:
    """SGD steps on `batches`: the loss per step, the first step's gradients and the weight updates after
    the last, all in float64, for assert_within_reference_rule. SGD keeps updates proportional to the
    gradients (Adam's normalisation turns rounding noise in near-zero gradients into lr-sized steps)."""
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().double().clone() for n, p in params.items()}
    opt = torch.optim.SGD(params.values(), lr=lr)
    losses, first_grads = [], None
    for ids, labels in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if first_grads is None:
            first_grads = torch.cat([params[n].grad.double().flatten() for n in params])
        losses.append(loss.detach().double())
        opt.step()
    updates = torch.cat([(p.detach().double() - start[n]).flatten() for n, p in params.items()])
    return dict(loss=torch.stack(losses), grads=first_grads, updates=updates)
