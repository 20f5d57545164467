"""The Sudoku task: puzzles, the bundled demo's contract, and its benchmark."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_diffusiongemma.examples.sudoku_puzzles import (
    box_shape,
    count_solutions,
    is_solution,
    make_puzzle,
    parse,
    solved_grid,
    to_text,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "mlx_diffusiongemma" / "demo"


@pytest.mark.parametrize("n", [4, 6, 9])
def test_generated_puzzles_have_one_solution_and_the_asked_givens(n):
    rng = random.Random(n)
    r, c = box_shape(n)
    for givens in (n * n // 2, n * n * 2 // 3):
        puzzle, solution = make_puzzle(n, givens, rng)
        assert sum(d != 0 for d in puzzle) == givens
        assert count_solutions(puzzle, n) == 1
        assert is_solution(solution, puzzle, n)
        for i in range(n):  # rows, columns and boxes hold every digit once
            assert sorted(solution[i * n : (i + 1) * n]) == list(range(1, n + 1))
            assert sorted(solution[i::n]) == list(range(1, n + 1))
            bi, bj = (i // (n // c)) * r, (i % (n // c)) * c
            box = [solution[(bi + x) * n + bj + y] for x in range(r) for y in range(c)]
            assert sorted(box) == list(range(1, n + 1))


def test_solution_counting_sees_ambiguity_and_contradictions():
    grid = solved_grid(4, random.Random(0))
    assert count_solutions(grid, 4) == 1
    assert count_solutions([0] * 16, 4) == 2  # many, counted up to the limit
    bad = list(grid)
    bad[1] = bad[0]
    assert count_solutions(bad, 4) == 0


def test_parse_takes_digits_with_or_without_spaces():
    p = parse("1 0 3 4 " * 4, 4)
    assert p == parse("1034" * 4, 4) and len(p) == 16
    with pytest.raises(ValueError, match="16 digits"):
        parse("123", 4)
    with pytest.raises(ValueError):
        parse("9" * 16, 4)


def test_demo_contract():
    task = json.loads((DEMO / "task.json").read_text())
    assert task["task"] == "sudoku" and list(box_shape(task["size"])) == task["box"]
    size = sum(f.stat().st_size for f in DEMO.iterdir())
    assert size <= 20e6


def easy_puzzles(n, count, givens):
    rng = random.Random("demo-test")
    return [make_puzzle(n, givens, rng) for _ in range(count)]


def test_demo_solves_puzzles_from_the_command_line():
    n = json.loads((DEMO / "task.json").read_text())["size"]
    solved = 0
    for i, (puzzle, solution) in enumerate(easy_puzzles(n, 4, 2 * n * n // 3)):
        text = "".join(map(str, puzzle)) if i % 2 else to_text(puzzle)  # with or without spaces
        r = subprocess.run(
            [sys.executable, "generate.py", "--prompt", text, "--seed", str(i)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        assert "Sudoku" in r.stderr and "--model google/diffusiongemma-26B-A4B-it" in r.stderr
        digits = [int(ch) for ch in r.stdout if ch.isdigit()][: n * n]
        assert len(digits) == n * n
        solved += digits == solution
    assert solved >= 3, solved


def test_demo_refuses_what_is_not_a_puzzle():
    r = subprocess.run(
        [sys.executable, "generate.py", "--prompt", "Why is the sky blue?"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and "puzzle" in r.stderr


def test_benchmark_scores_the_demo():
    from benchmarks.harness.sudoku import evaluate, held_out
    from mlx_diffusiongemma import load
    from mlx_diffusiongemma.examples.task import read_task

    model, tok = load(DEMO)
    task = read_task(DEMO)
    n = task["size"]
    puzzles = held_out(n, 2 * n * n // 3, 3, 0, set())
    for pinned in (False, True):
        r = evaluate(model, tok, task, puzzles, 0, pinned)
        assert r["puzzles"] == 3 and 0 <= r["exact"] <= 1 and r["median_steps"] >= 1
        if pinned:
            assert r["givens_kept"] == 1.0  # pinned givens cannot change
