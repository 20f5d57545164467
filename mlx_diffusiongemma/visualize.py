"""A live terminal view of denoising: accepted tokens appear as text, noise as shaded blocks.

Redraws in place with ANSI escapes (cursor up, clear to end of screen), so it works in any
plain terminal; committed canvases stay on screen as ordinary text."""

import shutil
import sys

from .utils import ceil_div

DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"
NOISE = "▒"


class CanvasView:
    def __init__(self, tokenizer, steps: int, stream=None):
        self.tok = tokenizer
        self.steps = steps
        self.out = stream or sys.stdout
        self.rows = 0  # terminal rows the current draft occupies

    def _piece(self, token: int) -> str:
        return self.tok.decode([token]).replace("\n", "⏎") if self.tok is not None else f"[{token}]"

    def _clear(self):
        if self.rows:
            self.out.write(f"\x1b[{self.rows}F\x1b[J")  # up to the draft's first row, clear below
            self.rows = 0

    def draft(self, d):
        width = max(20, shutil.get_terminal_size((80, 24)).columns)
        body = "".join(
            f"{BOLD}{self._piece(t)}{RESET}" if ok else f"{DIM}{NOISE}{RESET}"
            for t, ok in zip(d.tokens, d.accepted)
        )
        plain_len = sum(len(self._piece(t)) if ok else 1 for t, ok in zip(d.tokens, d.accepted))
        status = (
            f"{DIM}canvas {d.canvas + 1} · step {d.step}/{self.steps} · accepted "
            f"{sum(d.accepted)}/{len(d.accepted)} · mean entropy {d.mean_entropy:.3f}{RESET}"
        )
        self._clear()
        self.out.write(body + "\n" + status + "\n")
        self.out.flush()
        self.rows = ceil_div(plain_len, width) + 1 + (len(status) - len(DIM) - len(RESET)) // width

    def commit(self, text: str):
        self._clear()
        self.out.write(text)
        self.out.flush()
