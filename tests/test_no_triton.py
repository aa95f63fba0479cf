"""`import fastkern` works without triton: every op runs its PyTorch reference, and `fastkern env` says so."""

import subprocess
import sys
import textwrap


def test_import_and_ops_without_triton():
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None          # makes `import triton` raise ImportError
        sys.modules["triton.language"] = None
        import torch, fastkern
        from fastkern import runtime, cli
        assert not runtime.triton_available()
        assert runtime.path_for(torch.empty(0)) == "reference"
        g, u = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
        out = fastkern.ops.swiglu(g, u)
        torch.testing.assert_close(out, torch.nn.functional.silu(g) * u)
        out.sum().backward()
        cli.main(["env"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every op runs its PyTorch reference" in proc.stdout
