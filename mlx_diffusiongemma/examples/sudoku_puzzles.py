"""Sudoku puzzles with a unique solution, N x N with boxes of rows x cols (4x4, 6x6, 9x9).

Grids are digits 1..N row by row, 0 for a blank. A solved grid comes from the base pattern
shuffled by the symmetries that keep it valid (digits, rows within a band, bands, columns
within a stack, stacks); givens are removed in random order while the solution stays unique.
"""

import random
from typing import List, Optional, Tuple

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}


def box_shape(n: int) -> Tuple[int, int]:
    if n not in BOXES:
        raise ValueError(f"unsupported size {n} (choose from {', '.join(map(str, BOXES))})")
    return BOXES[n]


def solved_grid(n: int, rng: random.Random) -> List[int]:
    r, c = box_shape(n)
    digits = rng.sample(range(1, n + 1), n)

    def order(groups, size):  # shuffle the groups and the members within each
        return [
            g * size + m
            for g in rng.sample(range(groups), groups)
            for m in rng.sample(range(size), size)
        ]

    rows, cols = order(n // r, r), order(n // c, c)
    return [digits[(c * (i % r) + i // r + j) % n] for i in rows for j in cols]


def _units(n: int):
    r, c = box_shape(n)
    peers = []
    for cell in range(n * n):
        i, j = divmod(cell, n)
        b = (i // r) * r, (j // c) * c
        p = {i * n + k for k in range(n)} | {k * n + j for k in range(n)}
        p |= {(b[0] + x) * n + b[1] + y for x in range(r) for y in range(c)}
        p.discard(cell)
        peers.append(tuple(p))
    return peers


_PEERS = {}


def count_solutions(grid: List[int], n: int, limit: int = 2) -> int:
    """Solutions of `grid` (0 = blank), counted up to `limit`."""
    peers = _PEERS.setdefault(n, _units(n))
    full = (1 << (n + 1)) - 2
    g = list(grid)
    for cell, v in enumerate(g):
        if v and any(g[p] == v for p in peers[cell]):
            return 0

    def solve() -> int:
        best, best_mask, best_n = -1, 0, n + 1
        for cell, v in enumerate(g):
            if v:
                continue
            used = 0
            for p in peers[cell]:
                used |= 1 << g[p]
            mask = full & ~used
            k = bin(mask).count("1")
            if k < best_n:
                best, best_mask, best_n = cell, mask, k
                if k <= 1:
                    break
        if best < 0:
            return 1
        found = 0
        for d in range(1, n + 1):
            if best_mask >> d & 1:
                g[best] = d
                found += solve()
                g[best] = 0
                if found >= limit:
                    break
        return found

    return solve()


def make_puzzle(
    n: int, givens: int, rng: random.Random, tries: int = 20
) -> Optional[Tuple[List[int], List[int]]]:
    """(puzzle, solution) with exactly `givens` givens and one solution, or None if `tries`
    random removal orders all got stuck above that count."""
    if not 0 < givens <= n * n:
        raise ValueError(f"givens must be in 1..{n * n}")
    for _ in range(tries):
        solution = solved_grid(n, rng)
        puzzle = list(solution)
        blanks = n * n - givens
        for cell in rng.sample(range(n * n), n * n):
            if blanks == 0:
                return puzzle, solution
            puzzle[cell] = 0
            if count_solutions(puzzle, n) == 1:
                blanks -= 1
            else:
                puzzle[cell] = solution[cell]
        if blanks == 0:
            return puzzle, solution
    return None


def to_text(grid: List[int]) -> str:
    return " ".join(map(str, grid))


def parse(text: str, n: int) -> List[int]:
    """N*N digits, with or without spaces (0 or . for a blank)."""
    digits = [0 if ch == "." else int(ch) for ch in text if ch.isdigit() or ch == "."]
    if len(digits) != n * n or any(d > n for d in digits):
        raise ValueError(
            f"a {n}x{n} puzzle is {n * n} digits 0-{n} (0 for a blank), got {len(digits)}"
        )
    return digits


def is_solution(grid: List[int], puzzle: List[int], n: int) -> bool:
    return (
        all(p == 0 or p == g for p, g in zip(puzzle, grid))
        and 0 not in grid
        and count_solutions(grid, n) == 1
    )


def grid_lines(grid: List[int], n: int) -> List[str]:
    """The grid as rows, with box borders."""
    r, c = box_shape(n)
    lines = []
    for i in range(n):
        if i and i % r == 0:
            lines.append("-+-".join(["-" * (2 * c - 1)] * (n // c)))
        row = grid[i * n : (i + 1) * n]
        lines.append(
            " | ".join(
                " ".join(str(d) if d else "." for d in row[j : j + c]) for j in range(0, n, c)
            )
        )
    return lines
