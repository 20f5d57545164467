"""A watchdog for one rank of an `mx.distributed` run: a small child process that ends the rank
with one line when the other ranks stop answering, and that passes the rank's stderr on.

MLX's ring backend raises at once when a peer's process dies (its sockets close), but waits
forever for a peer that hangs, is stopped or cannot be reached: `mx.distributed.init` and every
collective hold the GIL while they wait, so no thread of the rank can act. A child process can.
The rank tells it by when it must hear from it again (`expect`, or `beat` once per unit of work
every rank does in step); when that time passes, the child writes `error: <message>` on stderr
and kills the rank. The rank's stderr runs through the child, which drops the ring backend's
per-socket complaints ("[ring] ..." lines, which precede the error the rank reports itself)
unless MLX_RING_VERBOSE is set, and lets one `error: ` line out, whoever writes it first: a rank
that reports a lost peer just as its deadline passes (the peer was ended by its own watchdog)
still ends with one line.

The child runs this file as a script: its imports are the standard library's alone.
"""

import os
import select
import signal
import subprocess
import sys
import time

TIMEOUT_ENV = "MLX_DIFFUSIONGEMMA_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds the other ranks may be silent, at least
SLOWEST_FACTOR = 3  # ... or this many times the slowest unit of work seen so far
FIRST_STEP_FACTOR = 5  # the first unit (a compile) may take this many times the timeout
RING_NOISE = b"[ring] "
ERROR = b"error: "


def timeout_setting() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, not {text!r}")
    return value


class Watchdog:
    """The rank's side. `expect(seconds, message)` arms the deadline, `clear()` disarms it,
    `beat()` re-arms it after a unit of work (`timeout`, or SLOWEST_FACTOR x the slowest unit
    since `start_beats`), `stop()` ends the child and gives the rank its own stderr back."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        self.timeout = timeout
        self.template = "no answer from the other ranks within {:.0f} s"
        self.last = None  # when the last unit of work ended
        self.slowest = 0.0
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        self.stderr = os.dup(2)
        self.child = subprocess.Popen(
            [sys.executable, "-I", __file__, str(os.getpid()), str(read_end)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            pass_fds=(read_end,),
        )
        os.close(read_end)
        os.dup2(write_end, 2)
        os.close(write_end)

    def _send(self, line: str):
        try:
            self.child.stdin.write(line.encode() + b"\n")
            self.child.stdin.flush()
        except (BrokenPipeError, ValueError):  # the child is gone: nothing left to guard
            pass

    def expect(self, seconds: float, message: str):
        self._send(f"expect {seconds:.3f} {' '.join(message.split())}")

    def clear(self):
        self._send("clear")

    def start_beats(self, template: str, first: float):
        """From now on, each `beat` ends a unit of work; the first may take `first` seconds.
        `template.format(seconds)` is the line written when a deadline passes."""
        self.template = template
        self.last = time.monotonic()
        self.expect(first, template.format(first))

    def beat(self):
        now = time.monotonic()
        if self.last is not None:
            self.slowest = max(self.slowest, now - self.last)
        self.last = now
        deadline = self.deadline()
        self.expect(deadline, self.template.format(deadline))

    def deadline(self) -> float:
        return max(self.timeout, SLOWEST_FACTOR * self.slowest)

    def stop(self):
        sys.stderr.flush()
        os.dup2(self.stderr, 2)
        os.close(self.stderr)
        self.child.stdin.close()
        self.child.wait()


def _forward(buf: bytes, verbose: bool, said: bool, out: int = 2):
    """Writes the whole lines of `buf` to `out` (dropping the ring's, and an `error: ` line once
    one was `said`) and a partial last line unless it may yet become one of the ring's; returns
    what is held back and whether an error line has been said."""
    while buf:
        nl = buf.find(b"\n")
        line = buf if nl < 0 else buf[: nl + 1]
        noise = not verbose and line.startswith(RING_NOISE)
        if nl < 0 and not verbose and RING_NOISE.startswith(line[: len(RING_NOISE)]):
            return buf, said  # too short to tell, or a ring line not yet ended
        if line.startswith(ERROR):
            noise, said = noise or said, True
        if not noise:
            _write(out, line)
        buf = buf[len(line) :]
    return buf, said


def _write(fd: int, data: bytes):
    try:
        os.write(fd, data)
    except OSError:  # nobody reads the rank's stderr any more
        pass


def _child(parent: int, err_fd: int):
    for s in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C is the rank's; its end ends this
        signal.signal(s, signal.SIG_IGN)
    verbose = bool(os.environ.get("MLX_RING_VERBOSE"))
    deadline, message, said = None, "", False
    control, held = b"", b""
    fds = [0, err_fd]
    while err_fd in fds:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select(fds, [], [], wait)
        if not ready:
            if deadline is not None and time.monotonic() >= deadline:
                if not said:  # else the rank is ending on an error of its own already
                    _write(2, ERROR + message.encode() + b"\n")
                deadline, said = None, True
                try:
                    os.kill(parent, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            continue
        for fd in ready:
            data = os.read(fd, 1 << 16)
            if not data:
                fds.remove(fd)
                if fd == 0:
                    deadline = None  # the rank stopped the watch (or is gone)
                continue
            if fd == err_fd:
                held, said = _forward(held + data, verbose, said)
                continue
            control += data
            *lines, control = control.split(b"\n")
            for line in lines:
                word, _, rest = line.decode().partition(" ")
                if word == "clear":
                    deadline = None
                elif word == "expect":
                    seconds, _, message = rest.partition(" ")
                    deadline = time.monotonic() + float(seconds)
    if held:
        _write(2, held)


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]))
