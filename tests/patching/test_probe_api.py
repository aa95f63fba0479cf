"""fastkern/patching/probe.py: the verdict, the comparison and the runner every patch-time probe shares."""

import dataclasses

import pytest
import torch
import torch.nn as nn

import fastkern
from fastkern.patching import probe
from fastkern.patching.probe import OK, NotProbed, ProbeVerdict, compare, meta_skip, run_probe, tolerance
from tests.models import tiny_model


def _linear():
    torch.manual_seed(0)
    return nn.Linear(8, 4)


def _x():
    return torch.randn(3, 8, generator=probe.probe_generator())


def test_verdict_kinds_and_report_text():
    assert OK.kind == "ok" and not OK.skips and OK.annotate("detail") == "detail"
    skipped = probe.not_probed("parameters on the meta device")
    assert not skipped.skips and skipped.annotate("detail") == "detail (parameters on the meta device; not probed)"
    wrong = probe.mismatch("relative error 1.00e+00 > 1e-05")
    assert wrong.skips and wrong.annotate("detail") == "detail"
    with pytest.raises(ValueError):
        ProbeVerdict("skip-probe")
    with pytest.raises(dataclasses.FrozenInstanceError):
        OK.kind = "mismatch"


def test_tolerances_per_kind_and_default():
    assert tolerance("mlp", torch.bfloat16) == 3e-2 and tolerance("norm", torch.bfloat16) == 1e-2
    assert tolerance("tiled_mlp", torch.float64) == 1e-12
    assert tolerance("rope", torch.float8_e4m3fn) == probe.DEFAULT_TOL


def test_compare_ok_within_tolerance():
    want = torch.ones(10)
    assert compare([(None, want * (1 + 1e-6), want)], 1e-5, "differs") == OK


def test_compare_mismatch_above_tolerance_names_the_output():
    want = torch.ones(10)
    verdict = compare([("output", want, want), ("grad x", want * 1.5, want)], 1e-2, "patched forward differs")
    assert verdict.kind == "mismatch"
    assert verdict.reason == "patched forward differs in grad x: relative error 5.00e-01 > 1e-02"


def test_compare_nan_is_a_mismatch():
    want = torch.ones(4)
    got = want.clone()
    got[1] = float("nan")
    verdict = compare([(None, got, want)], 1.0, "patched forward differs")
    assert verdict.skips and verdict.reason == "patched forward differs: relative error nan > 1e+00"


def test_meta_skip():
    with torch.device("meta"):
        meta = nn.Linear(8, 4)
    assert meta_skip(meta.weight) == probe.not_probed("parameters on the meta device")
    assert meta_skip(None) == probe.not_probed("parameters on the meta device")
    assert meta_skip(_linear().weight) is None


def test_run_probe_ok_and_mismatch():
    lin, x = _linear(), _x()
    assert run_probe(lin, lambda: lin(x), lambda: x @ lin.weight.T + lin.bias, 1e-5) == OK
    verdict = run_probe(lin, lambda: lin(x), lambda: lin(x) * 1.1, 1e-5)
    assert verdict.skips and verdict.reason.startswith("patched forward differs from Linear.forward: relative error")


def test_run_probe_failures():
    lin, x = _linear(), _x()

    def broken():
        raise RuntimeError("no kernel for this")

    verdict = run_probe(lin, lambda: lin(x), broken, 1e-5)
    assert verdict == probe.mismatch("patched forward failed on a probe input: RuntimeError: no kernel for this")
    assert run_probe(lin, lambda: lin(x), broken, 1e-5, failure="the MLP failed on a tile").reason.startswith(
        "the MLP failed on a tile: RuntimeError")
    with pytest.raises(RuntimeError, match="no kernel"):
        run_probe(lin, lambda: lin(x), broken, 1e-5, failure=None)

    def original_cannot_run():
        raise NotProbed("the original forward failed (RuntimeError)")

    assert run_probe(lin, original_cannot_run, broken, 1e-5, failure=None) == probe.not_probed(
        "the original forward failed (RuntimeError)")


def test_run_probe_with_gradients_under_no_grad():
    # Forward and backward, compared pairwise by name (norm.py's probe), even when patch_model runs under no_grad.
    lin, x = _linear(), _x()

    def run(scale):
        y = lin(x) * scale
        return (y, *torch.autograd.grad(y.sum(), (lin.weight,)))

    with torch.no_grad():
        assert run_probe(lin, lambda: run(1.0), lambda: run(1.0), 1e-5, names=("output", "grad weight"),
                         grad=True) == OK
        verdict = run_probe(lin, lambda: run(1.0), lambda: run(2.0), 1e-5, names=("output", "grad weight"),
                            grad=True)
    assert verdict.reason.startswith("patched forward differs from Linear.forward in output: relative error")


def test_run_probe_leaves_the_global_rng_and_training_flags_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    rng = torch.get_rng_state()
    x = _x()
    # Dropout would draw different masks (from the global RNG) for the two runs if the probe left it active.
    assert run_probe(model, lambda: model(x), lambda: model(x), 0.0) == OK
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())


def test_patcher_probes_leave_the_global_rng_as_it_was():
    model = tiny_model("llama")
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    report = fastkern.patch_model(model, tiled_mlp=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert report.patched_names("mlp") and report.patched_names("norm") and report.patched_names("rope"), report
    assert report.patched_names("tiled_mlp") and "not probed" not in str(report), report
