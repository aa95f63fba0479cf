"""`fastkern env` and `fastkern demo` run on CPU (short settings) and say what they did."""

import logging
import sys

import pytest
import torch

import fastkern
from fastkern import cli, demo
from fastkern.demo_common import quiet_bitsandbytes_cpu_notice


def test_env_prints_paths(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "swiglu" in out and "interpreter" in out and "patch specs:" in out
    # Every public op is listed; the two without a Triton kernel say what runs instead of a Triton path.
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("    ")}
    assert set(fastkern.ops.__all__) - {"NF4State"} <= set(lines)
    assert "sdpa" in lines["document_attention"] and "interpreter" not in lines["document_attention"]
    assert "forward" in lines["tiled_mlp"]


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastkern {fastkern.__version__}"


def test_env_help_shows_help_without_running_env(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["env", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastkern env") and "patch specs:" not in out


def test_demo_without_trl_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` raise ImportError
    with pytest.raises(demo.MissingExtraError, match=r'pip install "fastkern\[trl\]"'):
        demo.run_demo(demo.parse_args(["--steps", "1"]))
    assert demo.main(["--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert 'pip install "fastkern[trl]"' in err and "Traceback" not in err


def test_demo_lora_without_peft_names_the_install_command(monkeypatch, capsys):
    pytest.importorskip("trl")
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(demo.MissingExtraError, match=r'pip install "fastkern\[peft\]"'):
        demo.run_demo(demo.parse_args(["--steps", "1", "--lora", "4"]))
    assert demo.main(["--steps", "1", "--lora", "4", "--task", "dpo"]) == 1
    err = capsys.readouterr().err
    assert 'pip install "fastkern[peft]"' in err and "Traceback" not in err


def test_bitsandbytes_cpu_notice_dropped_and_nothing_else(caplog):
    quiet_bitsandbytes_cpu_notice()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "why")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


def test_unknown_command(capsys):
    assert cli.main(["nope"]) == 2


@pytest.mark.slow
def test_demo_trains_and_reports(capsys):
    pytest.importorskip("trl")
    args = demo.parse_args(["--steps", "12", "--batch", "4", "--length", "32", "--lr", "3e-3"])
    results = demo.run_demo(args)
    out = capsys.readouterr().out
    assert "| unpatched |" in out and "| fastkern.patch_model |" in out
    assert "LlamaMLP -> swiglu" in out
    if not torch.cuda.is_available():  # the CPU run says what its time and memory columns are not
        assert "process max RSS, cumulative" in out and "say nothing about speed" in out
    unpatched, patched = results
    # The task is learnable: the loss falls, and patched and unpatched train the same way.
    assert patched.final_loss < 0.8 * patched.losses[0]
    assert abs(patched.final_loss - unpatched.final_loss) < 0.05 * unpatched.final_loss
    assert torch.isfinite(torch.tensor(patched.losses)).all()
