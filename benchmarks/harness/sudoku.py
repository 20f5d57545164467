"""Section sudoku: the trained demo on held-out generated puzzles.

Exact solves (every cell), cell accuracy, givens kept, denoising steps per canvas and tokens/s
with the checkpoint's own sampler, by number of givens; then the same with the givens pinned in
the canvas through the infilling API (`Pins`), so the model only fills the blanks.
"""

import json
import random
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlx_diffusiongemma.bench.common import say


def held_out(n, givens, count, seed, exclude):
    """`count` puzzles with `givens` givens, none of them in `exclude` (a set of grids)."""
    from mlx_diffusiongemma.examples.sudoku_puzzles import make_puzzle

    rng = random.Random(f"bench-{seed}-{n}-{givens}")
    out = []
    while len(out) < count:
        made = make_puzzle(n, givens, rng)
        if made and tuple(made[0]) not in exclude:
            out.append(made)
    return out


def training_puzzles(path):
    """Puzzles of a train.jsonl (to keep them out of the benchmark)."""
    if not path:
        return set()
    seen = set()
    for line in Path(path).read_text().splitlines():
        if line.strip():
            seen.add(tuple(int(d) for d in json.loads(line)["prompt"].split()))
    return seen


def solve(model, tokenizer, task, puzzle, seed, pinned):
    from mlx_diffusiongemma.examples.sudoku_puzzles import to_text
    from mlx_diffusiongemma.examples.task import answer
    from mlx_diffusiongemma.generation import Pins, stream_generate

    pins = None
    if pinned:
        C = model.args.canvas_length
        ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in puzzle]
        mask = [d != 0 for d in puzzle] + [False] * (C - len(puzzle))
        tokens = ids + [0] * (C - len(puzzle))
        pins = Pins(mx.array([mask]), mx.array([tokens], dtype=mx.int32))
    t = time.perf_counter()
    text, steps, tokens = "", [], 0
    for r in stream_generate(model, tokenizer, to_text(puzzle), seed=seed, pins=pins):
        text += r.text
        steps.append(r.steps)
        tokens = r.generation_tokens
    return answer(task, text), steps, tokens, time.perf_counter() - t


def evaluate(model, tokenizer, task, puzzles, seed, pinned):
    n = task["size"]
    rows = []
    for i, (puzzle, solution) in enumerate(puzzles):
        grid, steps, tokens, secs = solve(model, tokenizer, task, puzzle, seed + i, pinned)
        blanks = [j for j, d in enumerate(puzzle) if d == 0]
        rows.append(
            dict(
                solved=grid == solution,
                cells=sum(a == b for a, b in zip(grid, solution)) / (n * n),
                blank_cells=sum(grid[j] == solution[j] for j in blanks) / max(len(blanks), 1),
                givens_kept=all(grid[j] == d for j, d in enumerate(puzzle) if d),
                steps=steps,
                tokens=tokens,
                secs=secs,
            )
        )
    steps = [s for r in rows for s in r["steps"]]
    return dict(
        puzzles=len(rows),
        exact=sum(r["solved"] for r in rows) / len(rows),
        cell_accuracy=statistics.mean(r["cells"] for r in rows),
        blank_cell_accuracy=statistics.mean(r["blank_cells"] for r in rows),
        givens_kept=sum(r["givens_kept"] for r in rows) / len(rows),
        median_steps=statistics.median(steps),
        mean_steps=statistics.mean(steps),
        tokens_per_s=sum(r["tokens"] for r in rows) / sum(r["secs"] for r in rows),
    )


def section_sudoku(opts, rep):
    from mlx_diffusiongemma.cli import DEMO_MODEL
    from mlx_diffusiongemma.examples.task import read_task
    from mlx_diffusiongemma.loader import load

    rep.header("sudoku")
    path = opts.path or DEMO_MODEL
    model, tokenizer = load(path, dtype=mx.float32 if mx.default_device() == mx.cpu else None)
    task = read_task(path)
    if task is None:
        raise SystemExit(f"{path} has no task.json: not a Sudoku checkpoint")
    n = task["size"]
    exclude = training_puzzles(opts.exclude)
    half = n * n // 2
    levels = sorted(
        {n * n // 3, (n * n // 3 + half) // 2, half, (half + 2 * n * n // 3) // 2, 2 * n * n // 3}
    )
    say(
        f"{n}x{n} Sudoku, {path}; {opts.puzzles} held-out puzzles at {half} givens, "
        f"{max(opts.puzzles // 4, 16)} at each other level; seed {opts.seed}"
        + (f"; {len(exclude)} training puzzles excluded" if exclude else "")
    )
    say(
        f"{'mode':7} {'givens':>6} {'puzzles':>7} {'exact':>7} {'cells':>7} {'blanks':>7} "
        f"{'givens kept':>11} {'median steps':>12} {'mean steps':>10} {'tok/s':>7}"
    )
    results = {}
    for pinned in (False, True):
        mode = "pinned" if pinned else "free"
        for givens in levels:
            count = opts.puzzles if givens == half else max(opts.puzzles // 4, 16)
            puzzles = held_out(n, givens, count, opts.seed, exclude)
            r = evaluate(model, tokenizer, task, puzzles, opts.seed, pinned)
            results[f"{mode}/{givens}"] = r
            say(
                f"{mode:7} {givens:>6} {r['puzzles']:>7} {r['exact']:>7.1%} "
                f"{r['cell_accuracy']:>7.1%} {r['blank_cell_accuracy']:>7.1%} "
                f"{r['givens_kept']:>11.1%} {r['median_steps']:>12} {r['mean_steps']:>10.1f} "
                f"{r['tokens_per_s']:>7.0f}"
            )
    rep.save("sudoku", {"size": n, "results": results})
    return results
