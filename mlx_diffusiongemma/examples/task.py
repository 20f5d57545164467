"""Checkpoints trained for one task carry `task.json` (the Sudoku demo:
`{"task": "sudoku", "size": N, "box": [rows, cols]}`); the CLIs read it to take and show that
task's input and output."""

import json
import random
from pathlib import Path
from typing import List, Optional

from .sudoku_puzzles import box_shape, grid_lines, make_puzzle, parse, to_text


def read_task(folder) -> Optional[dict]:
    f = Path(folder) / "task.json" if folder is not None else None
    if f is None or not f.is_file():
        return None
    task = json.loads(f.read_text())
    if not isinstance(task, dict) or task.get("task") != "sudoku":
        raise ValueError(f"{f}: unknown task {task!r}")
    n = task.get("size")
    if box_shape(n) != tuple(task.get("box", ())):
        raise ValueError(f"{f}: a {n}x{n} Sudoku has boxes {list(box_shape(n))}")
    return task


def example_puzzle(n: int) -> str:
    return "".join(map(str, make_puzzle(n, n * n // 2, random.Random(7))[0]))


def prompt_text(task: dict, text: Optional[str]) -> str:
    """The model's prompt for a puzzle given with or without spaces (default: an example)."""
    n = task["size"]
    return to_text(parse(text if text is not None else example_puzzle(n), n))


def answer(task: dict, text: str) -> List[int]:
    """The grid in the model's output (blanks where it wrote no digit)."""
    n = task["size"]
    digits = [int(ch) for ch in text if ch.isdigit()][: n * n]
    return digits + [0] * (n * n - len(digits))


def show(task: dict, grid: List[int]) -> str:
    return "\n".join(grid_lines(grid, task["size"]))
