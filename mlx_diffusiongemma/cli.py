"""What the command-line tools share: the --model argument with its demo default, and turning
known errors into one line on stderr with a non-zero exit."""

import sys
from contextlib import contextmanager
from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "demo"
REAL_MODEL = "google/diffusiongemma-26B-A4B-it"


def add_model_argument(parser):
    parser.add_argument("--model", default=None,
                        help=f"local folder or Hugging Face id (e.g. {REAL_MODEL}); default: the bundled demo checkpoint")
    parser.add_argument("--adapter-path", default=None,
                        help="fine-tuned adapters to add (a folder written by mlx_diffusiongemma.lora)")


def demo_notice() -> str:
    from .examples.task import example_puzzle, read_task

    task = read_task(DEMO_MODEL)
    if task is None:
        return "Using the bundled demo checkpoint."
    n = task["size"]
    return (f"Using the bundled demo: a small DiffusionGemma trained in this repo to solve {n}x{n} "
            f"Sudoku (prompt: the {n * n} digits row by row, 0 for a blank), e.g. "
            f"--prompt \"{example_puzzle(n)}\". Pass --model {REAL_MODEL} for the real model.")


def load_for_cli(model_arg, dtype=None, adapter_path=None):
    """`load` of --model, or of the demo checkpoint with a one-line notice of what it is."""
    from .loader import load

    if model_arg is None:
        print(demo_notice(), file=sys.stderr)
    return load(model_arg or DEMO_MODEL, dtype=dtype, adapter_path=adapter_path)


def user_errors():
    from .config import ConfigError
    from .loader import ModelNotFoundError
    from .safetensors_check import CheckpointError

    return (ValueError, ConfigError, CheckpointError, ModelNotFoundError, OSError)


@contextmanager
def one_line_errors():
    """Bad input ends the command with `error: ...` on stderr and exit status 1, no traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
