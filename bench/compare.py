"""Compare two results files (bench/schema.py); exit 1 when a median got slower than the threshold.

    python bench/compare.py BASELINE.json CURRENT.json [--threshold 0.10]

Rows are matched by (op, case, shape, dtype, impl); a matched row whose median time grew by more than
the threshold fails. Rows present on one side only, or untimed on either (an error row), are listed, not
failed (a peer may be missing on one machine). Rows measured on different devices are compared as asked,
with both device names printed first.
"""

from __future__ import annotations

import argparse
import sys

import schema


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline")
    parser.add_argument("current")
    parser.add_argument("--threshold", type=float, default=0.10)
    args = parser.parse_args(argv)
    base = {schema.key(r): r for r in schema.read(args.baseline)}
    cur = {schema.key(r): r for r in schema.read(args.current)}
    devices = lambda rows: sorted({r["device"] for r in rows.values()})  # noqa: E731
    print(f"baseline: {args.baseline} ({', '.join(devices(base))}; commit {_commits(base)})")
    print(f"current:  {args.current} ({', '.join(devices(cur))}; commit {_commits(cur)})")
    failed = False
    for k in sorted(base.keys() | cur.keys()):
        name = " | ".join(k)
        if k not in base or k not in cur:
            print(f"  only in {'current' if k in cur else 'baseline'}: {name}")
            continue
        old, new = base[k]["ms"], cur[k]["ms"]
        if old is None or new is None:
            print(f"  not timed in {'baseline' if old is None else 'current'}: {name}")
            continue
        change = new / old - 1
        slower = change > args.threshold
        failed |= slower
        print(f"  {'REGRESSION' if slower else 'ok':<10} {change:+7.1%}  {old:9.4f} ms -> {new:9.4f} ms  {name}")
    return 1 if failed else 0


def _commits(rows: dict) -> str:
    return ", ".join(sorted({str(r["commit"])[:12] for r in rows.values()}))


if __name__ == "__main__":
    sys.exit(main())
