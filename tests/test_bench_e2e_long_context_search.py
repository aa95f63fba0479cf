"""bench/e2e/long_context_search.py: the search lands exactly on the fit / no-fit boundary (a fake step, then the
tiny model under a simulated cap on the CPU); the extrapolation to full depth follows docs/long_context.md's
formula on synthetic results and labels its rows; extrapolated rows are validated by the schema; the memory
plot's series (and its clean skip without matplotlib)."""

import json
import random
import sys

import pytest

from bench import plot, schema

pytest.importorskip("peft")
from bench.e2e import long_context  # noqa: E402
from bench.e2e import long_context_search as search  # noqa: E402

ENV = dict(device="cpu (test)", torch="t", triton=None, transformers=None, commit=None)


def _fake(boundary):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= boundary, 1.0

    return fits, calls


@pytest.mark.parametrize("granularity", [1, 7, 4096])
def test_search_finds_the_boundary_exactly(granularity):
    rng = random.Random(granularity)
    max_len = 300 * granularity
    for _ in range(60):
        boundary = rng.randrange(0, max_len + 2 * granularity)
        start = rng.choice([granularity, rng.randrange(1, max_len + 1), max_len, boundary])
        fits, calls = _fake(boundary)
        found = search.search_longest(fits, start=start, granularity=granularity, max_len=max_len)
        expect = min(boundary, max_len) // granularity * granularity
        assert found["best"] == expect, (boundary, start, found)
        assert len(calls) == len(set(calls)) <= 2 * 9 + 3  # galloping + bisection: logarithmic, no repeats
        if expect < max_len // granularity * granularity:
            assert found["first_miss"] == expect + granularity and found["stopped"] == "converged"
        else:
            assert found["stopped"] == "max length"


def test_search_time_budget_stops_with_the_best_known():
    now = [0.0]

    def fits(n):
        now[0] += n / 100  # a probe's time grows with its length
        return n <= 10_000, n / 100

    found = search.search_longest(fits, start=100, granularity=100, max_len=100_000, budget_s=30.0,
                                  clock=lambda: now[0], estimate_s=search.quadratic_estimate)
    assert found["stopped"] == "time budget"
    assert found["best"] == max(n for n, ok, _ in found["probes"] if ok) <= 10_000
    assert now[0] <= 30.0  # no probe was started that was estimated to pass the budget
    assert search.quadratic_estimate(400, [(100, True, 1.0), (200, False, 2.0)]) == 2.0 * 4
    assert search.quadratic_estimate(50, [(100, True, 1.0)]) == 1.0


def test_tiny_search_under_a_simulated_cap(tmp_path):
    """The tiny model's step on the CPU, its tracked peak against a simulated cap: the search's answer fits, the
    next length does not, and every probe's verdict matches its own tracked peak."""
    cap_mib = 1.0
    assert long_context.main(["--tiny", "--variant", "unpatched", "--search", "--granularity", "32",
                              "--search-max", "512", "--memory-cap-mib", str(cap_mib), "--warmup-len", "16",
                              "--out", str(tmp_path)]) == 0
    rows = schema.read(tmp_path / "long_context.json")
    summary = rows[-1]
    probes = {r["extra"]["seq_len"]: r for r in rows[:-1]}
    best = summary["extra"]["longest_seq_len"]
    assert summary["case"] == "LoRA bf16 r16 train longest trainable sequence" and best > 0
    assert probes[best]["error"] is None and probes[best + 32]["error"].startswith("out of memory (simulated cap")
    assert summary["extra"]["first_miss"] == best + 32 and summary["extra"]["stopped"] == "converged"
    assert summary["peak_mib"] == probes[best]["peak_mib"] <= cap_mib < probes[best + 32]["peak_mib"]
    for n, r in probes.items():
        assert (r["error"] is None) == (r["peak_mib"] <= cap_mib), r
    assert "predicted_max_seq_len" in summary["extra"]  # plan_memory's answer sits next to the measured one


def _row(layers, seq_len, ms, peak_mib, variant="defaults", host_gib=None, pool=None, impl="defaults (tiled_mlp auto)"):
    return schema.make_row(ENV, op="long_context", case="QLoRA NF4 r32 train step", shape=f"8b x{layers} layers T{seq_len}",
                           dtype="bfloat16", impl=impl, ms=ms, throughput=seq_len / ms * 1e3, throughput_unit="tokens/s",
                           loss=1.0, peak_mib=peak_mib, peak_scope="total", seq_len=seq_len, layers=layers, size="8b",
                           full_layers=32, hidden=4096, variant=variant, trainer="loop", host_gib=host_gib,
                           offload_pool_gib=pool)


def test_extrapolation_follows_the_documented_formula(tmp_path, capsys):
    t = 131072
    ckpt_mib = t * 4096 * 2 / 2**20  # one [T, H] bf16 layer input: 1024 MiB
    # defaults: checkpoints on the device; t(2) = 10 + 2*5 s, t(4) = 10 + 4*5 s
    a = [_row(2, t, 20_000.0, 30_000.0), _row(2, 2 * t, 70_000.0, 50_000.0)]
    b = [_row(4, t, 30_000.0, 32_048.0), _row(4, 2 * t, 110_000.0, 54_096.0)]
    # long, offloaded: 2 layers' checkpoints of 1 GiB each fit a 20 GiB host budget, 20 of 32 layers at depth
    a.append(_row(2, t, 21_000.0, 20_000.0, "long", 20.0, pool=2.0, impl="long (tiled_mlp auto)"))
    b.append(_row(4, t, 31_000.0, 20_010.0, "long", 20.0, pool=4.0, impl="long (tiled_mlp auto)"))
    for name, rows in (("l2", a), ("l4", b)):
        (tmp_path / name).mkdir()
        schema.write(str(tmp_path / name / "long_context.json"), rows)
    full = [_row(32, t, 165_000.0, 90_000.0)]
    (tmp_path / "full").mkdir()
    schema.write(str(tmp_path / "full" / "long_context.json"), full)
    out = tmp_path / "out"
    assert long_context.main(["--extrapolate", str(tmp_path / "l2"), str(tmp_path / "l4"), "--full",
                              str(tmp_path / "full"), "--out", str(out)]) == 0
    rows = schema.read(out / "long_context_extrapolated.json")
    by = {(r["impl"], r["extra"]["seq_len"]): r for r in rows}
    d1 = by[("defaults (tiled_mlp auto)", t)]
    assert d1["extrapolated"] is True and d1["loss"] is None and d1["shape"] == f"8b x32 layers T{t}"
    assert d1["ms"] == pytest.approx((10 + 32 * 5) * 1e3) and d1["throughput"] == pytest.approx(t / 170)
    assert d1["extra"]["t_fixed_s"] == pytest.approx(10) and d1["extra"]["t_layer_s"] == pytest.approx(5)
    assert d1["peak_mib"] == pytest.approx(30_000 + 30 * ckpt_mib)
    assert d1["extra"]["measured_peak_slope_mib_per_layer"] == pytest.approx(1024)
    d2 = by[("defaults (tiled_mlp auto)", 2 * t)]
    assert d2["ms"] == pytest.approx((30 + 32 * 20) * 1e3) and d2["peak_mib"] == pytest.approx(50_000 + 30 * 2 * ckpt_mib)
    long = by[("long (tiled_mlp auto)", t)]
    # 32 - 20 layers' inputs stay on the device; each added layer also keeps its own 5 MiB (weights, adapters)
    assert long["peak_mib"] == pytest.approx(20_000 + 30 * 5 + 12 * ckpt_mib)
    assert long["extra"]["resident_mib_per_layer"] == pytest.approx(5) and d1["extra"]["resident_mib_per_layer"] == 0
    assert long["extra"]["host_layers"] == 20 and long["extra"]["host_pool_gib"] == pytest.approx(20.0)
    check = json.loads((out / "long_context_extrapolation_check.json").read_text())
    assert check == [dict(case=d1["case"], impl=d1["impl"], seq_len=t, layers=32, extrapolated_s=170.0, measured_s=165.0,
                          time_ratio=pytest.approx(170 / 165), extrapolated_peak_mib=d1["peak_mib"],
                          measured_peak_mib=90_000.0, peak_ratio=pytest.approx(d1["peak_mib"] / 90_000))]
    assert "(extrapolated)" in plot.tables(rows)
    with pytest.raises(ValueError, match="both runs have 2 layers"):
        search.extrapolate(a, a)


def test_schema_validates_the_extrapolated_label():
    row = schema.make_row(ENV, op="x", case="c", shape="s", dtype="d", impl="i", ms=1.0, extrapolated=True)
    assert schema.is_extrapolated(row)
    measured = schema.make_row(ENV, op="x", case="c", shape="s", dtype="d", impl="i", ms=1.0, loss=2.0)
    assert "extrapolated" not in measured and not schema.is_extrapolated(measured)
    with pytest.raises(ValueError, match="no loss"):
        schema.make_row(ENV, op="x", case="c", shape="s", dtype="d", impl="i", ms=1.0, loss=2.0, extrapolated=True)
    with pytest.raises(ValueError, match="extrapolated"):
        schema.check_row({**measured, "extrapolated": False})
    with pytest.raises(ValueError, match="unknown fields"):
        schema.check_row({**measured, "estimated": True})


def test_memory_plot_series_and_clean_skip(monkeypatch, capsys, tmp_path):
    rows = [_row(2, 4096, 1.0, 10.0), _row(2, 1024, 1.0, 5.0), _row(4, 1024, 1.0, 6.0),
            schema.make_row(ENV, op="long_context", case="QLoRA NF4 r32 train step", shape="8b x2 layers T8192",
                            dtype="bfloat16", impl="x", error="out of memory")]
    series = plot.memory_series(rows)
    assert series == {"QLoRA NF4 r32 train step, defaults (tiled_mlp auto), 2 layers": [(1024, 5.0), (4096, 10.0)],
                      "QLoRA NF4 r32 train step, defaults (tiled_mlp auto), 4 layers": [(1024, 6.0)]}
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert plot.memory_vs_length_png(rows, str(tmp_path / "m.png")) is False
    assert "matplotlib is not installed" in capsys.readouterr().out and not (tmp_path / "m.png").exists()
