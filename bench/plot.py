"""Tables and plots from results files (bench/schema.py): the tables of docs/benchmarks.md and its figure.

    python bench/plot.py DIR/results.json [MORE.json ...] [--ops glu,rope] [--png docs/benchmarks.png]

Prints one markdown table per (op, case, shape, dtype): implementation, median ms, throughput, peak
memory and the check or error, with the device, software and commit they came from. ``--png`` also draws,
per op, the fwd+bwd (or training-step) throughput (or, where a case has none, the time) of each
implementation at the largest shape measured. ``--memory-vs-length PNG`` draws peak memory against
sequence length, one line per (case, implementation), from rows that record ``extra.seq_len`` (the
long-context bench; extrapolated rows dashed).
"""

from __future__ import annotations

import argparse
import re
import sys

try:  # run as a script (python bench/plot.py): bench/ is on the path
    import schema
except ImportError:  # imported as bench.plot
    from bench import schema


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def tables(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["case"], r["shape"], r["dtype"]), []).append(r)
    out = []
    for (op, case, shape, dtype), group in groups.items():
        first = group[0]
        out.append(f"### {op}: {case}, {shape}, {dtype}")
        out.append(f"{first['device']}; torch {first['torch']}, triton {first['triton']}, transformers "
                   f"{first['transformers']}; fastkern {str(first['commit'])[:12]}")
        out.append("")
        unit = next((r["throughput_unit"] for r in group if r["throughput_unit"]), None)
        scope = next((r["peak_scope"] for r in group if r["peak_scope"]), "extra")
        out.append(f"| impl | ms (median) | {unit or 'throughput'} | peak {scope} MiB | check / note |")
        out.append("|---|---|---|---|---|")
        for r in group:
            impl = r["impl"] + (" (extrapolated)" if schema.is_extrapolated(r) else "")
            out.append(f"| {impl} | {_fmt(r['ms'])} | {_fmt(r['throughput'], 2)} | {_fmt(r['peak_mib'], 0)} | "
                       f"{r['error'] or _notes(r)} |")
        out.append("")
    return "\n".join(out)


def _notes(row: dict) -> str:
    """The loss and the short scalar extras of a row (lists such as a loss trajectory, and multi-line text
    such as a patch report, stay in the file)."""
    items = ([("loss", row["loss"])] if row["loss"] is not None else []) + list(row["extra"].items())
    return ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in items
                     if not isinstance(v, (list, dict)) and not (isinstance(v, str) and ("\n" in v or not v)))


def png(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["ms"] is not None and ("fwd+bwd" in r["case"] or "step" in r["case"])]
    ops = list(dict.fromkeys(r["op"] for r in timed))
    if not ops:
        raise SystemExit("plot: no timed fwd+bwd or training-step rows to draw")
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        mine = [r for r in timed if r["op"] == op]
        largest = max(mine, key=lambda r: (r["throughput"] is not None, _size(r["shape"])))
        picked = [r for r in mine if (r["case"], r["shape"]) == (largest["case"], largest["shape"])]
        use_tp = all(r["throughput"] is not None for r in picked)
        ax.bar([r["impl"] for r in picked], [r["throughput"] if use_tp else r["ms"] for r in picked])
        ax.set_ylabel(f"{picked[0]['throughput_unit']} (higher is better)" if use_tp else "ms (lower is better)")
        ax.set_title(f"{op}: {largest['case']}\n{largest['shape']} {largest['dtype']}, {largest['device']}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


def memory_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{label: [(seq_len, peak MiB), ...] sorted by length} for rows with a peak and a sequence length
    (``extra.seq_len``, else a ``T<n>`` word of the shape); label: case, impl and "extrapolated" where so."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["peak_mib"] is None or r["ms"] is None:
            continue
        seq_len = r["extra"].get("seq_len")
        if seq_len is None:
            found = re.search(r"\bT(\d+)\b", r["shape"])
            if found is None:
                continue
            seq_len = int(found.group(1))
        layers = r["extra"].get("layers")
        label = f"{r['case']}, {r['impl']}" + (f", {layers} layers" if layers is not None else "")
        label += " (extrapolated)" if schema.is_extrapolated(r) else ""
        series.setdefault(label, []).append((int(seq_len), float(r["peak_mib"])))
    return {k: sorted(v) for k, v in series.items()}


def memory_vs_length_png(rows: list[dict], path: str) -> bool:
    """Peak memory (GiB) against sequence length per (case, impl); False, with a message, when matplotlib is
    not installed or no row has both."""
    series = memory_series(rows)
    if not series:
        print("plot: no rows with a peak and a sequence length; no figure drawn")
        return False
    try:
        import matplotlib
    except ImportError:
        print(f"plot: matplotlib is not installed; {path} not drawn (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = {r["peak_scope"] for r in rows if r["peak_mib"] is not None}
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] / 1024 for p in points], marker="o",
                linestyle="--" if label.endswith("(extrapolated)") else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(f"peak memory, GiB ({'/'.join(sorted(scopes))})")
    devices = sorted({r["device"] for r in rows})
    ax.set_title(f"peak memory vs sequence length: {', '.join(devices)}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print("wrote", path)
    return True


def _size(shape: str) -> int:
    """A sort key for 'largest': the product of the numbers in the shape text."""
    total = 1
    for part in shape.replace("x", " ").replace("×", " ").split():
        digits = "".join(c for c in part if c.isdigit())
        total *= int(digits) if digits else 1
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--ops", default=None, help="comma-separated: only these ops")
    parser.add_argument("--png", default=None, help="also draw the figure to this path")
    parser.add_argument("--memory-vs-length", default=None, metavar="PNG",
                        help="also draw peak memory against sequence length (rows with extra.seq_len)")
    args = parser.parse_args(argv)
    rows = [r for path in args.results for r in schema.read(path)]
    if args.ops:
        rows = [r for r in rows if r["op"] in args.ops.split(",")]
    print(tables(rows))
    if args.png:
        png(rows, args.png)
    if args.memory_vs_length:
        memory_vs_length_png(rows, args.memory_vs_length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
