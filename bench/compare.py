"""Compare a pytest-benchmark JSON to a committed baseline; exit 1 on a regression.

    python3 bench/compare.py BASELINE.json CURRENT.json [--threshold 0.10]

Benches are matched by name; a bench whose median grew by more than the threshold fails. Benches
missing from either side are listed, not failed (peers may be absent on one machine).
"""

import argparse
import json
import sys


def medians(path):
    with open(path) as f:
        data = json.load(f)
    return {b["fullname"]: b["stats"]["median"] for b in data["benchmarks"]}, data.get("machine_info", {})


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("baseline")
    parser.add_argument("current")
    parser.add_argument("--threshold", type=float, default=0.10)
    args = parser.parse_args(argv)
    base, base_info = medians(args.baseline)
    cur, _ = medians(args.current)
    failed = False
    print(f"baseline: {args.baseline} ({base_info.get('node', '?')})")
    for name in sorted(base.keys() | cur.keys()):
        if name not in base or name not in cur:
            print(f"  only in {'current' if name in cur else 'baseline'}: {name}")
            continue
        change = cur[name] / base[name] - 1
        flag = "REGRESSION" if change > args.threshold else "ok"
        failed |= change > args.threshold
        print(f"  {flag:<10} {change:+7.1%}  {base[name] * 1e3:9.3f} ms -> {cur[name] * 1e3:9.3f} ms  {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
