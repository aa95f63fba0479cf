"""`fastkern env` and `fastkern demo` run on CPU (short settings) and say what they did."""

import pytest
import torch

from fastkern import cli, demo


def test_env_prints_paths(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "swiglu" in out and "interpreter" in out and "patch specs:" in out


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
    unpatched, patched = results
    # The task is learnable: the loss falls, and patched and unpatched train the same way.
    assert patched.final_loss < 0.8 * patched.losses[0]
    assert abs(patched.final_loss - unpatched.final_loss) < 0.05 * unpatched.final_loss
    assert torch.isfinite(torch.tensor(patched.losses)).all()
