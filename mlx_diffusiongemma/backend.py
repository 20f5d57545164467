"""Where the CPU backend's own strategies are switched on or off.

On the CPU, the model and the sampler take faster routes of their own (expert tiles, row-parallel
streams, a polynomial exp; see cpu_*.py and expert_tiles.py); Metal and CUDA never take them.
Training takes the plain ops on every backend: it runs under `mx.compile` and `mx.grad`, where
the CPU routes' host reads of per-expert counts cannot happen, and its gradients then follow the
same ops as the reference everywhere. `plain_ops()` turns them off for the calling thread.
"""

from contextlib import contextmanager
from contextvars import ContextVar

import mlx.core as mx

_plain = ContextVar("plain_ops", default=False)


def cpu_strategies() -> bool:
    """True where the CPU's own routes run: the CPU is the default device and no
    `plain_ops()` block is open in this thread."""
    return not _plain.get() and mx.default_device() == mx.cpu


@contextmanager
def plain_ops():
    """Within this block the model runs the ops Metal and CUDA run, on every device."""
    token = _plain.set(True)
    try:
        yield
    finally:
        _plain.reset(token)
