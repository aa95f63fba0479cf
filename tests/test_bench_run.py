"""bench/run.py --tiny on the CPU: every ported case runs, checks its implementations and writes rows in the
one schema (bench/schema.py); bench/plot.py turns the file into tables. CPU times mean nothing: only that
the cases run and their checks pass is asserted."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = "glu,rope,rope_qk_norm,rms_norm,linear_cross_entropy,linear_cross_entropy_onchip,lora_linear,nf4,packed_attention,moe_experts"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--ops", OPS, "--tiny", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "results.json", json.loads((out / "results.json").read_text()), done.stdout


def test_every_op_writes_checked_rows_in_the_schema(results):
    _, data, _ = results
    assert data["schema"] == "fastkern-bench/2"
    rows = data["rows"]
    fields = {"op", "case", "shape", "dtype", "impl", "ms", "peak_mib", "peak_scope", "throughput", "throughput_unit", "loss", "device",
              "torch", "triton", "transformers", "commit", "error", "extra"}
    assert all(set(r) == fields for r in rows)
    assert {r["op"] for r in rows} == set(OPS.split(",")) - {"linear_cross_entropy_onchip"} | {"copy"}
    assert any("onchip" in r["impl"] for r in rows)
    fastkern_rows = [r for r in rows if r["impl"].startswith("fastkern")]
    assert fastkern_rows and all(r["error"] is None and r["ms"] > 0 for r in fastkern_rows)
    # Every checked fastkern row agreed with its fp32 reference to fp32 accuracy (the bench's own bar is 2e-2).
    checked = [r["extra"]["rel_err"] for r in fastkern_rows if "rel_err" in r["extra"]]
    assert checked and max(checked) < 1e-4
    packed = [r for r in rows if r["op"] == "packed_attention"]
    assert [r["impl"] for r in packed] == ["transformers sdpa", "fastkern packing", "fastkern packing + rope"]
    assert all(r["extra"]["grad_rel_err"] < 1e-4 for r in packed)
    assert all(r["device"].startswith("cpu") and r["dtype"] == "float32" for r in rows if r["op"] not in ("copy", "nf4"))
    # Routed experts: fastkern and transformers' eager experts on every layer shape, checked against fp32 eager.
    moe = [r for r in rows if r["op"] == "moe_experts" and r["error"] is None]
    for family in ("qwen3_30b_a3b", "mixtral_8x7b", "gpt_oss_20b"):
        assert {"fastkern", "transformers eager"} <= {r["impl"] for r in moe if family in r["shape"]}
    assert all(r["ms"] > 0 and r["extra"]["rel_err"] < 1e-4 and r["throughput_unit"] == "TFLOP/s" for r in moe)
    # NF4 dequantization is checked bit-exact (an inexact row carries an error, which fastkern rows may not).
    assert {r["dtype"] for r in rows if r["op"] == "nf4"} == {"bfloat16"}


def test_plot_makes_the_tables(results):
    path, _, printed = results
    assert "| fastkern |" in printed
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "plot.py"), str(path), "--ops", "glu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "### glu: swiglu fwd+bwd, 3x40, float32" in done.stdout and "rope" not in done.stdout


def test_unknown_op_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--ops", "glu,nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown ops ['nope']" in done.stderr


def test_moe_lora_case_builds_each_adapted_weight_once_per_call(monkeypatch):
    # transformers' eager experts read gate_up_proj[e] per expert; without caching the parametrization,
    # each read would rebuild (and keep for backward) the whole adapted [E, out, in] weight.
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from cases import moe_experts as case

    shape = case.TINY["qwen3_30b_a3b_lora_r16"]
    module = case.experts_module(shape, "eager", torch.float32, "cpu")
    calls = []
    adapted = case.ExpertLoRA.forward
    monkeypatch.setattr(case.ExpertLoRA, "forward", lambda self, weight: calls.append(1) or adapted(self, weight))
    out, *grads = case.fwd_bwd(module, module, *case.routing(shape, torch.float32, "cpu"))
    assert len(calls) == 2  # gate_up_proj and down_proj, once each
    assert torch.isfinite(out).all() and len(grads) == 2 + 4 and all(g is not None for g in grads)


def test_commit_is_the_checkout_of_fastkern_itself(tmp_path):
    """A fastkern tree unpacked inside another repository's checkout (a copy in a subfolder)
    records no commit rather than the outer repository's HEAD; its own checkout records its HEAD."""
    from bench import schema

    root = pathlib.Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                      text=True).stdout.strip() != str(root):
        pytest.skip("this fastkern is not a git checkout of its own")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert schema.fastkern_commit().removesuffix("+dirty") == head
    outer = tmp_path / "outer"
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    nested = outer / "snap"
    for part in ("fastkern", "bench"):
        shutil.copytree(root / part, nested / part, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys; sys.path.insert(0, '.'); from bench import schema; print(schema.fastkern_commit())"
    out = subprocess.run([sys.executable, "-c", code], cwd=nested, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"
    assert schema.fastkern_commit("abc123") == "abc123"
