"""bench/compare.py on the committed H100 baseline: passes against itself, fails on a >10% slower median."""

import copy
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASELINE = ROOT / "bench" / "baselines" / "h100.json"


def compare(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def test_compare_against_committed_baseline(tmp_path):
    data = json.loads(BASELINE.read_text())
    assert data["schema"] == "fastkern-bench/2"
    assert any(r["impl"] == "fastkern" and r["shape"] == "16384x14336" and r["case"] == "swiglu fwd+bwd wall"
               for r in data["rows"])
    assert compare(BASELINE, BASELINE).returncode == 0
    path = tmp_path / "new.json"
    for factor, code in ((1.11, 1), (1.09, 0)):
        changed = copy.deepcopy(data)
        changed["rows"][0]["ms"] *= factor
        path.write_text(json.dumps(changed))
        done = compare(BASELINE, path)
        assert done.returncode == code, done.stdout + done.stderr
        assert ("REGRESSION" in done.stdout) == (code == 1)


def test_rows_on_one_side_or_untimed_are_listed_not_failed(tmp_path):
    data = json.loads(BASELINE.read_text())
    changed = copy.deepcopy(data)
    changed["rows"][0]["ms"], changed["rows"][0]["error"] = None, "out of memory"
    del changed["rows"][1]
    path = tmp_path / "new.json"
    path.write_text(json.dumps(changed))
    done = compare(BASELINE, path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not timed in current" in done.stdout and "only in baseline" in done.stdout


def test_a_file_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"benchmarks": []}))
    done = compare(path, BASELINE)
    assert done.returncode != 0 and "not a fastkern-bench/2 results file" in done.stderr
