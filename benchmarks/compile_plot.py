"""Plots `python -m benchmarks.harness graph` runs: the host cost per denoising step, compiled and
not, of this CPU's graph and of the graph a GPU host builds (mx.fast's ops one operation each),
with the issue's 0.2x mark on each uncompiled bar.

    python benchmarks/compile_plot.py OUT.png LABEL=RUNS.jsonl [LABEL=RUNS.jsonl ...]

Needs matplotlib (not a dependency of the package)."""

import json
import sys
from pathlib import Path


def graph_runs(path: Path):
    """The `graph` sections' figures in a JSON-lines report, in order."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [f for f in lines if f.get("section") == "graph"]


def plot(out: Path, sources):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []  # (label, compiled ms, uncompiled ms, GPU-shaped compiled, GPU-shaped uncompiled)
    for label, path in sources:
        for i, g in enumerate(graph_runs(path), 1):
            one = g["fast_ops_as_one"]
            ms = [g["build_s"], g["build_uncompiled_s"], one["build_s"], one["build_uncompiled_s"]]
            bars.append((f"{label}\nrun {i}", *[m * 1e3 for m in ms]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    titles = ("this CPU's graph (mx.fast's ops decomposed)", "shaped as a GPU host's graph")
    for ax, title, col in zip(axes, titles, (1, 3)):
        x = range(len(bars))
        compiled = [b[col] for b in bars]
        uncompiled = [b[col + 1] for b in bars]
        ax.bar([i - 0.2 for i in x], uncompiled, 0.4, color="C7", label="uncompiled")
        ax.bar([i + 0.2 for i in x], compiled, 0.4, color="C0", label="compiled (replayed)")
        for i, u in zip(x, uncompiled):
            ax.hlines(0.2 * u, i - 0.45, i + 0.45, colors="C3", linestyles="--", lw=1)
        for i, (c, u) in enumerate(zip(compiled, uncompiled)):
            ax.text(i + 0.2, c + 0.05, f"{c / u:.2f}x", ha="center", fontsize=8)
        ax.axhline(2.0, color="k", lw=0.8, ls=":")
        ax.text(len(bars) - 0.5, 2.05, "2 ms target", ha="right", fontsize=8)
        ax.set_xticks(list(x), [b[0] for b in bars], fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("host ms per denoising step (fastest of 70)")
    axes[0].plot([], [], color="C3", ls="--", lw=1, label="0.2x uncompiled (the issue's target)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("Full shape (30 layers, mixed 4-bit, 4096-token prompt), Metal/CUDA code path")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv):
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        raise SystemExit(__doc__.split("\n\n")[1].strip())
    plot(Path(argv[0]), [(a.split("=", 1)[0], Path(a.split("=", 1)[1])) for a in argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
