"""The example scripts in examples/ run end to end on CPU with short settings, patched."""

import ast
import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"fastkern_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _only_fastkern_line_is_patch_model(name):
    tree = ast.parse((EXAMPLES / f"{name}.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               and any("fastkern" in (a.name or "") for a in n.names) | ("fastkern" in (getattr(n, "module", "") or ""))]
    assert [ast.unparse(n) for n in imports] == ["import fastkern"]
    uses = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "fastkern"]
    calls = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and "fastkern" in ast.unparse(n.func)]
    assert len(uses) == 1 and len(calls) == 1 and calls[0].startswith("fastkern.patch_model(model"), (uses, calls)


def _assert_finite(logs, keys, steps):
    assert len(logs) == steps, f"expected {steps} logged steps, got {len(logs)}"
    for h in logs:
        for key in keys:
            assert math.isfinite(h[key]), (key, h)


def test_sft_example_learns(capsys):
    _only_fastkern_line_is_patch_model("sft")
    logs = load_example("sft").main(["--steps", "10", "--batch", "4", "--length", "24"])
    _assert_finite(logs, ["loss", "grad_norm"], 10)
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    assert "step   10" in capsys.readouterr().out


def test_dpo_example_lora(capsys):
    _only_fastkern_line_is_patch_model("dpo")
    logs = load_example("dpo").main(["--steps", "3", "--batch", "2", "--lora", "4"])
    _assert_finite(logs, ["loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"], 3)
    # Step 1 starts at the reference model: the sigmoid loss is log 2 exactly.
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert "margin" in capsys.readouterr().out


def test_grpo_example_with_kl(capsys):
    _only_fastkern_line_is_patch_model("grpo")
    logs = load_example("grpo").main(["--steps", "2", "--batch", "4", "--generations", "4",
                                       "--completion-length", "4", "--beta", "0.04", "--lora", "4"])
    _assert_finite(logs, ["loss", "grad_norm", "entropy", "reward", "kl"], 2)
    assert all(0.0 <= h["reward"] <= 1.0 for h in logs)
    assert "reward" in capsys.readouterr().out


def test_grpo_example_full_finetuning_with_trl_loaded_reference():
    """Full fine-tuning with beta > 0: TRL loads the reference model itself, with the patched model's
    attention implementation name (fastkern_packed_sdpa). At step 1 policy == reference, so the KL must be
    0 up to rounding: a reference whose attention differed (or failed to load) would show here."""
    logs = load_example("grpo").main(["--steps", "2", "--batch", "4", "--generations", "4",
                                       "--completion-length", "4", "--beta", "0.04"])
    _assert_finite(logs, ["loss", "grad_norm", "kl"], 2)
    assert abs(logs[0]["kl"]) < 1e-6, logs[0]
    assert logs[1]["kl"] > 0  # the policy moved away from the reference after one update


@pytest.mark.slow
@pytest.mark.parametrize("task", ["grpo", "dpo"])
def test_demo_task_side_by_side(task, capsys):
    from fastkern import demo

    argv = ["--task", task, "--steps", "2", "--lora", "4"]
    argv += ["--batch", "4", "--length", "4"] if task == "grpo" else ["--batch", "2", "--length", "32"]
    unpatched, patched = demo.run_demo(demo.parse_args(argv))
    out = capsys.readouterr().out
    assert "| unpatched |" in out and "| fastkern.patch_model |" in out and "LlamaMLP -> swiglu" in out
    # Same seeds, same data: the patched run trains like the unpatched one.
    assert patched.losses == pytest.approx(unpatched.losses, rel=1e-4, abs=1e-6)
    assert all(math.isfinite(x) for x in patched.losses)
    key = "rewards" if task == "grpo" else "margins"
    assert patched.extra[key] == pytest.approx(unpatched.extra[key], rel=1e-4, abs=1e-6)
