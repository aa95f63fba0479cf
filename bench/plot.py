"""Plot docs/benchmarks.png from a device run's JSON files.

    python3 bench/plot.py DIR [--out docs/benchmarks.png]

Left: SwiGLU/GeGLU fwd+bwd effective bandwidth at 16384x14336 bf16 per implementation, against the
measured 3.00 TB/s copy ceiling. Right: the end-to-end SFT step time, unpatched vs patched.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--out", default="docs/benchmarks.png")
    args = parser.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    glu = json.load(open(os.path.join(args.dir, "bench_glu.json")))
    rows = [r for r in glu["results"] if r.get("rows") == 16384 and "fwd_bwd_tbps" in r]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    acts = ["silu", "gelu_tanh"]
    width = 0.8 / len(impls)
    ax = axes[0]
    for i, impl in enumerate(impls):
        vals = [next((r["fwd_bwd_tbps"] for r in rows if r["impl"] == impl and r["act"] == a), 0) for a in acts]
        ax.bar([j + i * width for j in range(len(acts))], vals, width, label=impl)
    ax.axhline(3.0, color="k", linestyle="--", linewidth=1, label="copy bandwidth 3.00 TB/s")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(acts))], ["SwiGLU", "GeGLU(tanh)"])
    ax.set_ylabel("fwd+bwd effective TB/s (higher is better)")
    ax.set_title(f"16384x14336 bf16, {glu['device']}")
    ax.legend(fontsize=7, loc="lower right")
    e2e_path = os.path.join(args.dir, "bench_sft_e2e.json")
    ax = axes[1]
    if os.path.exists(e2e_path):
        e2e = json.load(open(e2e_path))
        labels = [r["label"].replace("TRL default ", "TRL ").replace(": ", ":\n") for r in e2e["results"]]
        colors = ["tab:gray" if "unpatched" in r["label"] else "tab:blue" for r in e2e["results"]]
        ax.bar(labels, [r["step_s"] * 1e3 for r in e2e["results"]], color=colors)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_ylabel("step time, ms (lower is better)")
        a = e2e.get("args", {})
        data = (f"packed docs of {a['mixed']}..{a['length']} tokens" if a.get("packing") and a.get("mixed")
                else f"B{a.get('batch', 2)}xT{a.get('length', 4096)}")
        ax.set_title(f"TRL SFT, Llama-1B shape, LoRA r{a.get('lora', 16)}, {data}", fontsize=10)
    else:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
