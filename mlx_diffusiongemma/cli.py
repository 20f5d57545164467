"""What the command-line tools share: the --model argument with its demo default, and how a
command ends on bad input or a signal: one line on stderr and a non-zero exit, never a
traceback.

For a new command: `sys.exit(run_cli(body, args))` in its `main` (or `with one_line_errors():`
around the body), and `OneLineParser` for its arguments. Module-level imports of such a command
stay light (no mlx), so that a Ctrl-C while it starts is handled too."""

import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "demo"
REAL_MODEL = "google/diffusiongemma-26B-A4B-it"
INTERRUPTED = 130  # exit status after SIGINT / SIGTERM, as a shell reports it


def add_model_argument(parser):
    parser.add_argument(
        "--model",
        default=None,
        help=f"local folder or Hugging Face id (e.g. {REAL_MODEL}); default: the bundled demo checkpoint",
    )
    parser.add_argument(
        "--adapter-path",
        default=None,
        help="fine-tuned adapters to add (a folder written by mlx_diffusiongemma.lora)",
    )


def demo_notice() -> str:
    from .examples.task import example_puzzle, read_task

    task = read_task(DEMO_MODEL)
    if task is None:
        return "Using the bundled demo checkpoint."
    n = task["size"]
    return (
        f"Using the bundled demo: a small DiffusionGemma trained in this repo to solve {n}x{n} "
        f"Sudoku (prompt: the {n * n} digits row by row, 0 for a blank), e.g. "
        f'--prompt "{example_puzzle(n)}". Pass --model {REAL_MODEL} for the real model.'
    )


def add_distributed_arguments(parser):
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="launched on several ranks (mlx.launch): split the layers across them instead of "
        "each layer (tensor parallel, the default); see docs/DISTRIBUTED.md",
    )
    parser.add_argument(
        "--pipeline-split",
        type=layer_counts,
        default=None,
        metavar="N,N,...",
        help="with --pipeline: layers per rank, from rank 0 (which runs the last ones); "
        "default: even",
    )


def layer_counts(text: str) -> list:
    """An argparse type: comma-separated positive layer counts."""
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"invalid split {text!r} (e.g. 16,14)")
    return counts


def load_for_cli(model_arg, dtype=None, adapter_path=None, pipeline=False, pipeline_split=None):
    """`load` of --model, or of the demo checkpoint with a one-line notice of what it is. When
    launched on several ranks, split across them (`sharded_load`: tensor parallel, or the
    layers with `pipeline`), and only rank 0 writes to stdout."""
    from .distributed import init_group, rank_zero_output, sharded_load
    from .loader import load

    group = init_group() if launched() else None
    if group is not None:
        rank_zero_output(group)
    if model_arg is None and (group is None or group.rank() == 0):
        print(demo_notice(), file=sys.stderr)
    path = model_arg or DEMO_MODEL
    if group is None or group.size() == 1:
        return load(path, dtype=dtype, adapter_path=adapter_path)
    if adapter_path is not None:
        raise ValueError(
            "--adapter-path cannot be used across ranks yet: fuse the adapters into the "
            "checkpoint first (python -m mlx_diffusiongemma.fuse)"
        )
    return sharded_load(
        path,
        pipeline_group=group if pipeline else None,
        tensor_group=None if pipeline else group,
        pipeline_split=pipeline_split,
        dtype=dtype,
    )


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (`prog: error: ...`, exit 2), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (0 to 65535)")
    return port


def user_errors():
    """The exception classes that mean bad input (a file, a flag, a value), not a bug."""
    from .config import ConfigError
    from .loader import ModelNotFoundError
    from .safetensors_check import CheckpointError

    errors = (ValueError, ConfigError, CheckpointError, ModelNotFoundError, OSError)
    try:  # a chat template that does not render
        from jinja2 import TemplateError

        errors += (TemplateError,)
    except ImportError:
        pass
    return errors


# Where a launcher (mlx.launch, mpirun) says which rank this process is.
RANK_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launched() -> bool:
    """Whether a launcher started this process as one rank of several (`mlx.launch -n 1` gives
    its one rank an empty ring hostfile)."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile) and not Path(hostfile).read_text().strip():
        return False
    return any(v in os.environ for v in RANK_VARIABLES)


# MLX's distributed backends raise RuntimeErrors named after them when a peer's connection closes.
BACKEND_PREFIXES = ("[ring]", "[jaccl]", "[mpi]", "[nccl]")
LOST_PEER = "lost the connection to another rank (it exited, or its machine or link is down)"


def lost_peer(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and str(e).startswith(BACKEND_PREFIXES)


# Taken by whoever writes a rank's final `error:` line: its main thread and its watchdog
# thread can both see a peer go, and the rank still ends with one line.
_last_words = threading.Lock()


def say_error(message: str, fd=None, last: bool = True) -> bool:
    """Writes `error: message` on stderr (or `fd`) unless the process's last error line was
    written already; whether it did. `last`: this is that line (else other errors may follow,
    as in a process that runs a command's main more than once)."""
    if not _last_words.acquire(blocking=False):
        return False
    line = f"error: {message}\n"
    try:
        if fd is None:
            sys.stderr.write(line)
            sys.stderr.flush()
        else:
            os.write(fd, line.encode())
    except (OSError, ValueError):  # nobody reads it any more
        pass
    if not last:
        _last_words.release()
    return True


def error_line(e: BaseException) -> str:
    """One line for an error: the OS's reason and file name, or the message's first line."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}{f': {e.filename}' if e.filename else ''}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _Signals:
    """SIGINT and SIGTERM raise KeyboardInterrupt once; another one before `rearm` (while the
    first is being handled: cleanup, the final message, interpreter shutdown) ends the process
    at once, instead of a second KeyboardInterrupt's traceback. Either way the command's
    `interrupted` line is written once."""

    def __init__(self):
        self.pending = False
        self.message = None  # the line still to write, None once written

    def __call__(self, signum, frame):
        if self.pending:
            if self.message is not None:
                os.write(2, f"\n{self.message}\n".encode())
            os._exit(INTERRUPTED)
        self.pending = True
        raise KeyboardInterrupt

    def rearm(self, message=None):
        self.pending = False
        if message is not None:
            self.message = message

    def announce(self):
        message, self.message = self.message, None
        if message is not None:
            print(f"\n{message}", file=sys.stderr, flush=True)


_signals = _Signals()


def rearm_interrupts():
    """After an interrupt was handled and the command goes on (chat stopping one reply), the
    next Ctrl-C raises KeyboardInterrupt again."""
    _signals.rearm()


@contextmanager
def one_line_errors(interrupted: str = "interrupted"):
    """Bad input ends the command with `error: ...` on stderr and exit status 1; SIGINT or
    SIGTERM with `interrupted` and status 130; a closed stdout (`| head`) quietly. Meant for a
    command's main: after an interrupt the handlers stay, so a further signal exits at once.
    A rank of a launched run says which one it is: mlx.launch ends every rank when one fails."""
    rank = launched()  # a rank's error is its last words (a watchdog may be about to speak)
    if "MLX_RANK" in os.environ and interrupted == "interrupted":
        interrupted = f"rank {os.environ['MLX_RANK']}: interrupted (or ended by mlx.launch)"
    main_thread = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM) if main_thread else ()
    previous = {s: signal.getsignal(s) for s in signals}
    _signals.rearm(interrupted)
    for s in previous:  # handlers can only be set from the main thread
        signal.signal(s, _signals)
    try:
        yield
    except KeyboardInterrupt:
        _signals.pending = True
        _signals.announce()
        # Python's shutdown puts its own handlers back to the default, which would let a second
        # Ctrl-C arriving then end the process by the signal (status -2): ignored from here.
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        sys.exit(INTERRUPTED)
    except BrokenPipeError:
        # Python would report the failed flush of stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except user_errors() as e:
        say_error(error_line(e), last=rank)
        sys.exit(1)
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        say_error(LOST_PEER, last=rank)
        sys.exit(1)
    finally:
        if not _signals.pending:
            for s, handler in previous.items():
                signal.signal(s, handler)


def run_cli(body, *args, interrupted: str = "interrupted", **kwargs) -> int:
    """`body(*args, **kwargs)` under `one_line_errors`; returns the exit status (body's own
    return value, or 0) instead of exiting, for mains that return one."""
    try:
        with one_line_errors(interrupted):
            return body(*args, **kwargs) or 0
    except SystemExit as e:  # sys.exit(): 0; sys.exit("message"): 1, as Python exits
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1
