"""The Sudoku demo's training curve: validation loss (from the run's train_log.jsonl) and exact
solves on held-out puzzles at half givens for numbered checkpoints, as a PNG and JSON.

    python benchmarks/sudoku_curve.py --work-dir sudoku_run --every 400 --puzzles 64

Needs matplotlib (`pip install matplotlib`), which the package itself does not.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.harness


def solve_rates(work: Path, every: int, puzzles: int, seed: int):
    from benchmarks.harness.sudoku import evaluate, held_out, training_puzzles
    from mlx_diffusiongemma.examples.task import read_task
    from mlx_diffusiongemma.loader import load

    model, tok = load(work / "init", dtype=mx.float32)
    task = read_task(work / "init")
    n = task["size"]
    test = held_out(n, n * n // 2, puzzles, seed, training_puzzles(work / "data" / "train.jsonl"))
    out = {}
    files = sorted((work / "adapters").glob("[0-9]" * 7 + "_adapters.safetensors"))
    for f in files:
        it = int(re.match(r"\d+", f.name).group())
        if it % every and f != files[-1]:
            continue
        model.load_weights(str(f), strict=False)
        r = evaluate(model, tok, task, test, seed, pinned=False)
        out[it] = r
        print(
            f"iteration {it}: exact {r['exact']:.1%}, cells {r['cell_accuracy']:.1%}, "
            f"median steps {r['median_steps']}",
            flush=True,
        )
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work-dir", default="sudoku_run")
    p.add_argument("--every", type=int, default=400)
    p.add_argument("--puzzles", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "sudoku_training"))
    a = p.parse_args()
    work = Path(a.work_dir)
    log = [json.loads(l) for l in (work / "adapters" / "train_log.jsonl").read_text().splitlines()]
    val = {}
    for r in log:  # a resumed run repeats iterations: the last word on each counts
        if "val_loss" in r:
            val[r["iteration"]] = r["val_loss"]
    rates = solve_rates(work, a.every, a.puzzles, a.seed)
    Path(a.out + ".json").write_text(json.dumps({"val_loss": val, "solve": rates}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = sorted(val)
    ax.plot(xs, [val[x] for x in xs], color="tab:blue", label="validation loss")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("validation loss (diffusion + AR)", color="tab:blue")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    its = sorted(rates)
    ax2.plot(
        its, [100 * rates[i]["exact"] for i in its], "o-", color="tab:red", label="exact solves"
    )
    ax2.set_ylabel(f"exact solves, % ({a.puzzles} held-out puzzles)", color="tab:red")
    ax2.set_ylim(0, 100)
    ax.set_title("Sudoku demo: training from random initialisation on a 2-core CPU")
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=120)
    print(f"wrote {a.out}.png")


if __name__ == "__main__":
    main()
