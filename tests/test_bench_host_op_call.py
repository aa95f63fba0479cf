"""bench/host_op_call.py runs, counts, and leaves the kernels as it found them."""

import importlib.util
import pathlib

import fastkern.kernels.glu as glu_kernels
import fastkern.ops.glu as glu_ops

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "host_op_call.py"


def _load():
    spec = importlib.util.spec_from_file_location("host_op_call", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_op_call_measures_every_case_and_restores_the_kernels():
    bench = _load()
    kernel, op_path = glu_kernels.glu_forward_kernel, glu_ops.op_path
    rows = bench.measure(calls=3, repeats=1)
    assert set(rows) == {"glu", "glu_overwrite", "rms_norm", "lora_linear", "nf4_matmul", "rope", "rope_inplace"}
    for name, row in rows.items():
        assert row["us"] > 0 and row["py_calls"] > 10 and row["aten_ops"] > 0, (name, row)
    assert glu_kernels.glu_forward_kernel is kernel and glu_ops.op_path is op_path
