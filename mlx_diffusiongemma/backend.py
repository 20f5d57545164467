"""Where the CPU backend's own strategies are switched on or off.

On the CPU, the model and the sampler take faster routes of their own (expert tiles, a fused
polynomial exp, row-parallel streams; see cpu_*.py and expert_tiles.py); Metal and CUDA never
take them. Training keeps the CPU's arithmetic (it is differentiable, and under `mx.compile` the
expert tiles take a fixed size and read nothing from the host) but runs on one stream:
`one_stream()` turns the row-parallel stream splitting off for the calling thread.
"""

from contextlib import contextmanager
from contextvars import ContextVar

import mlx.core as mx

_one_stream = ContextVar("one_stream", default=False)


def cpu_strategies() -> bool:
    """True where the CPU's own routes run: the CPU is MLX's default device."""
    return mx.default_device() == mx.cpu


def stream_splitting() -> bool:
    """True where work may be split across one CPU stream per core."""
    return cpu_strategies() and not _one_stream.get()


@contextmanager
def one_stream():
    """Within this block (in this thread) nothing is split across CPU streams."""
    token = _one_stream.set(True)
    try:
        yield
    finally:
        _one_stream.reset(token)
