"""bench/compare.py: passes on the committed H100 baseline against itself, fails on a >10% regression."""

import copy
import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def test_compare_against_committed_baseline(tmp_path, capsys):
    baseline = ROOT / "bench" / "baselines" / "h100.json"
    data = json.loads(baseline.read_text())
    assert any("fastkern-silu-16384x14336" in b["name"] for b in data["benchmarks"])
    assert compare.main([str(baseline), str(baseline)]) == 0
    slower = copy.deepcopy(data)
    slower["benchmarks"][0]["stats"]["median"] *= 1.11
    path = tmp_path / "slower.json"
    path.write_text(json.dumps(slower))
    assert compare.main([str(baseline), str(path)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    within = copy.deepcopy(data)
    within["benchmarks"][0]["stats"]["median"] *= 1.09
    path.write_text(json.dumps(within))
    assert compare.main([str(baseline), str(path)]) == 0
