#!/usr/bin/env python3
"""Plot prefill speed-up vs prompt length from `cargo xtask bench`'s results.json.

Usage: plot_bench.py <results.json> <out.png>

One line per model x type x policy: stock prefill time / our prefill time (median over repetitions);
1.0 (no change) is drawn as a dashed line. Needs matplotlib (the xtask venv has it).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        results = json.load(f)
    series = {}
    for row in results.get("rows", []):
        key = f'{row["model"]} {row["quant"]} {row["policy"]}'
        series.setdefault(key, []).append((row["prompt"], row["prefill_speedup"]))
    if not series:
        print("no rows to plot", file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p for p, _ in pts], [s for _, s in pts], marker="o", label=key)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    prompts = sorted({p for pts in series.values() for p, _ in pts})
    ax.set_xticks(prompts)
    ax.set_xticklabels([str(p) for p in prompts])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill speed-up (stock time / ours)")
    machine = results.get("machine", {})
    ax.set_title(
        f'ggml-coreml prefill vs stock — {machine.get("cpu", "?")}, {machine.get("nproc", "?")} cores',
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(sys.argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
