"""The LoRA step's peak memory at the real depth (`benchmark lora --part depth` logs) as stacked
bars: 4-bit weights, adapters, Adam state and the step, against the 24 GB target.

    python benchmarks/lora_memory_plot.py benchmarks/logs/lora_depth/before-9e3084c.txt \\
        benchmarks/logs/lora_depth/after-35e089b.txt \\
        benchmarks/logs/lora_depth/after-ordered-fdf7205.txt \\
        --labels "whole-logits head" "sliced head" "ordered checkpoint" --out benchmarks/lora_memory.png

Needs matplotlib (`pip install matplotlib`), which the package itself does not.
"""

import argparse
import re
from pathlib import Path

RUN = re.compile(
    r"--num-layers +(-?\d+): measured peak .* = shared float32 weights [\d.]+ \+ adapters ([\d.]+)"
    r" \+ Adam ([\d.]+) \+ step ([\d.]+) GB"
)
WEIGHTS = re.compile(r"with the mixed 4-bit weights \(([\d.]+) GB\)")


def read_runs(log: Path):
    """[(num_layers, weights, adapters, adam, step)] in GB, in the log's order."""
    runs, text = [], log.read_text().splitlines()
    for i, line in enumerate(text):
        m = RUN.search(line)
        if m:
            w = WEIGHTS.search(text[i + 1])
            runs.append((int(m[1]), float(w[1]), *(float(x) for x in m.groups()[1:])))
    if not runs:
        raise SystemExit(f"{log}: no depth runs in it")
    return runs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+", type=Path)
    p.add_argument("--labels", nargs="+")
    p.add_argument("--target", type=float, default=24.0)
    p.add_argument("--out", type=Path, default=Path("lora_memory.png"))
    a = p.parse_args()
    labels = a.labels or [log.stem for log in a.logs]
    if len(labels) != len(a.logs):
        raise SystemExit("give one label per log")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []  # grouped by --num-layers (all layers last), each group in the logs' order
    for j, (log, label) in enumerate(zip(a.logs, labels)):
        for n, *parts in read_runs(log):
            bars.append(((n == -1, n, j), f"--num-layers {n}\n{label}", parts))
    bars = [b[1:] for b in sorted(bars, key=lambda b: b[0])]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = ["4-bit weights", "LoRA adapters", "Adam state", "step (activations, gradients)"]
    colors = ["#9e9e9e", "#4c72b0", "#55a868", "#dd8452"]
    bottom = [0.0] * len(bars)
    for k, (name, color) in enumerate(zip(names, colors)):
        vals = [parts[k] for _, parts in bars]
        ax.bar(range(len(bars)), vals, bottom=bottom, color=color, label=name, width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, total in enumerate(bottom):
        ax.text(i, total - 1.2, f"{total:.2f} GB", ha="center", fontsize=9, color="white")
    ax.axhline(a.target, color="#c44e52", linestyle="--", linewidth=1)
    ax.text(-0.45, a.target + 0.25, f"target {a.target:.0f} GB", color="#c44e52", fontsize=9)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("peak memory (GB)")
    ax.set_ylim(0, max(bottom + [a.target]) * 1.15)
    ax.set_title(
        "LoRA step on the 4-bit 26B, --grad-checkpoint, 30 layers (measured, float32 activations)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
