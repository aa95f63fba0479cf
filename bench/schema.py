"""The one row schema of every bench result, and the one JSON file shape that holds rows.

A results file is ``{"schema": "fastkern-bench/2", "rows": [row, ...]}``. A row is one implementation
timed one way on one input: a kernel call (bench/cases/) or a training step (bench/e2e/):

    op               the op (``glu``, ``rope``, ``rms_norm``, ...; ``copy`` for the copy ceiling)
    case             what was timed and how (``swiglu fwd+bwd``, ``fwd+bwd GPU (CUDA graph)``, ...)
    shape            the input, as text (``16384x14336``, ``B4 T4096 Hq32 Hk8 D128``)
    dtype            ``bfloat16``, ``float32``, ...
    impl             the implementation (``fastkern``, ``torch eager``, ``liger``, ...)
    ms               median milliseconds of a call or a step (None when the row was not timed: see ``error``)
    peak_mib         peak memory in MiB, of the kind ``peak_scope`` names (None where not measured: CPU)
    peak_scope       ``extra``: peak allocated during one call beyond what was allocated before it (the
                     cases); ``total``: torch's peak allocated over the run, model included (training
                     steps); ``host``: the process's peak resident set (CPU runs); None iff no peak
    throughput       effective GB/s (bytes that must move), TFLOP/s (GEMM work) or tokens/s (training
                     tokens of all ranks per second), ``throughput_unit``
    loss             the training loss of the run's last step (bench/e2e/), else None
    device, torch, triton, transformers, commit
                     where it ran: the device's name, the versions, the fastkern commit (``+dirty``
                     when the working tree had changes)
    error            why the row has no time (a peer that is missing or wrong, out of memory), else None
    extra            anything else the case records (relative error of its check, saved bytes, notes)
    extrapolated     optional, present only as ``true``: the row was not measured but derived from measured
                     rows (e.g. a full-depth step from steps at fewer layers, bench/e2e/long_context.py);
                     such a row has no loss. Rows without the field were measured.

Rows are matched across files (bench/compare.py) by ``key(row)``: (op, case, shape, dtype, impl).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess

SCHEMA = "fastkern-bench/2"
UNITS = ("GB/s", "TFLOP/s", "tokens/s", None)
PEAK_SCOPES = ("extra", "total", "host", None)
# field -> accepted types (None: the value may be null)
FIELDS = {
    "op": (str,), "case": (str,), "shape": (str,), "dtype": (str,), "impl": (str,),
    "ms": (float, int, type(None)), "peak_mib": (float, int, type(None)), "peak_scope": (str, type(None)),
    "throughput": (float, int, type(None)), "throughput_unit": (str, type(None)), "loss": (float, int, type(None)),
    "device": (str,), "torch": (str, type(None)), "triton": (str, type(None)),
    "transformers": (str, type(None)), "commit": (str, type(None)),
    "error": (str, type(None)), "extra": (dict,),
}
# field -> accepted values, for fields a row may leave out
OPTIONAL_FIELDS = {"extrapolated": (True,)}


def key(row: dict) -> tuple:
    return row["op"], row["case"], row["shape"], row["dtype"], row["impl"]


def is_extrapolated(row: dict) -> bool:
    return row.get("extrapolated", False) is True


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: recorded as unknown
        return None


def fastkern_commit(commit: str | None = None) -> str | None:
    """The commit of the fastkern that is imported (``+dirty`` when its tree has changes), or ``commit``
    when given (a revision unpacked without git, as ``run.py --base`` does)."""
    if commit:
        return commit
    try:
        import fastkern

        where = os.path.dirname(os.path.dirname(os.path.abspath(fastkern.__file__)))
        top = subprocess.run(["git", "-C", where, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not top or os.path.realpath(top) != os.path.realpath(where):
            return None  # not a checkout of its own (an unpacked archive inside another repository's tree)
        head = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--", "fastkern"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except Exception:  # no git, or fastkern installed from a wheel
        return None


def environment(device: str, commit: str | None = None) -> dict:
    """The device and software fields every row of this process carries."""
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({platform.processor() or platform.machine()})"
    return dict(device=name, torch=torch.__version__, triton=_version("triton"),
                transformers=_version("transformers"), commit=fastkern_commit(commit))


def make_row(env: dict, *, op: str, case: str, shape: str, dtype: str, impl: str, ms=None, peak_mib=None,
             peak_scope=None, throughput=None, throughput_unit=None, loss=None, error=None, extrapolated=False,
             **extra) -> dict:
    """One checked row; ``peak_scope`` defaults to ``extra`` (a case's per-call peak) where a peak is given;
    ``extrapolated=True`` labels a derived row (the field is left out of measured rows)."""
    peak_mib = _num(peak_mib)
    row = dict(op=op, case=case, shape=shape, dtype=dtype, impl=impl, ms=_num(ms), peak_mib=peak_mib,
               peak_scope=(peak_scope or "extra") if peak_mib is not None else None,
               throughput=_num(throughput), throughput_unit=throughput_unit if throughput is not None else None,
               loss=_num(loss),
               device=env["device"], torch=env["torch"], triton=env["triton"], transformers=env["transformers"],
               commit=env["commit"], error=error, extra=extra)
    if extrapolated:
        row["extrapolated"] = True
    check_row(row)
    return row


def _num(value):
    """float, or None for a missing or NaN measurement (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return None if value != value else value


def check_row(row: dict) -> None:
    missing = set(FIELDS) - set(row)
    unknown = set(row) - set(FIELDS) - set(OPTIONAL_FIELDS)
    if missing or unknown:
        raise ValueError(f"bench row: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}: {row}")
    for name, types in FIELDS.items():
        if not isinstance(row[name], types) or isinstance(row[name], bool):
            raise ValueError(f"bench row: {name}={row[name]!r} is not {'/'.join(t.__name__ for t in types)}")
    if row["throughput_unit"] not in UNITS:
        raise ValueError(f"bench row: throughput_unit {row['throughput_unit']!r} is not one of {UNITS}")
    if row["peak_scope"] not in PEAK_SCOPES or (row["peak_scope"] is None) != (row["peak_mib"] is None):
        raise ValueError(f"bench row: peak_scope {row['peak_scope']!r} must be one of {PEAK_SCOPES[:-1]} exactly "
                         f"when peak_mib is given ({row['peak_mib']!r})")
    if row["ms"] is None and row["error"] is None:
        raise ValueError(f"bench row: a row without a time says why (error): {row}")
    for name, values in OPTIONAL_FIELDS.items():
        if name in row and not any(row[name] is v for v in values):
            raise ValueError(f"bench row: {name}={row[name]!r} is not one of {values} (leave the field out instead)")
    if is_extrapolated(row) and row["loss"] is not None:
        raise ValueError(f"bench row: an extrapolated row ran no step, so it has no loss: {row}")


def write(path: str, rows: list[dict]) -> None:
    for row in rows:
        check_row(row)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(schema=SCHEMA, rows=rows), f, indent=1)


def read(path: str) -> list[dict]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} results file")
    for row in data["rows"]:
        check_row(row)
    return data["rows"]
