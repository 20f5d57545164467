"""Row-parallel work on the CPU backend: one MLX stream per core.

MLX's CPU backend runs a stream's ops one after another on that stream's thread, and only its
matmuls (BLAS) use more than one core. Its exp and tanh are scalar: ~65-75 M elements/s on a
2-core Xeon, so the vocabulary-sized passes of a denoising step (softcap, sampler), the GELUs and
the attention softmax (cpu.attention_cpu) keep one core busy while the other waits. Work that
is independent across rows is split here across one stream per core; MLX orders the streams by
their data dependencies (figures: benchmarks/RESULTS.md). Results are bit-identical: each row's
arithmetic is the same.

Metal and CUDA run each op across the whole device already: they never come here.
"""

import os
import threading
from contextlib import contextmanager
from contextvars import ContextVar

import mlx.core as mx

from ..utils import ceil_div
from .default import over_slices

MAX_STREAMS = 8
# Slices for `cache_sized` calls hold at most this many elements of the first split argument:
# MLX's compiled CPU graphs still write some intermediates to memory, and while they stay in the
# L2 cache (2 MB per core on the Xeon measured) the polynomial exp runs ~3x faster (cpu_math.py).
CACHE_ELEMENTS = 1 << 19
_local = threading.local()  # streams are made per thread (the server runs MLX on a worker thread)
_one_stream = ContextVar("one_stream", default=False)


@contextmanager
def one_stream():
    """Within this block (in this thread) nothing is split across CPU streams. Training keeps
    the CPU's arithmetic (it is differentiable) but runs on one stream."""
    token = _one_stream.set(True)
    try:
        yield
    finally:
        _one_stream.reset(token)


def _core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_streams():
    """This thread's CPU streams (none with one core or within `one_stream`)."""
    if _one_stream.get():
        return []
    streams = getattr(_local, "streams", None)
    if streams is None:
        n = min(MAX_STREAMS, _core_count())
        streams = _local.streams = [mx.new_stream(mx.cpu) for _ in range(n)] if n > 1 else []
    return streams


def row_parallel(fn, args, axes, out_axis=None, min_parts=1, cache_sized=False):
    """fn(*args), with each arg whose entry in `axes` is an int split along that axis into
    slices, fn run on each slice, and the outputs (an array or a tuple of arrays) concatenated
    along `out_axis` (default: the first split axis). Args with axis None are shared whole.
    fn must treat the split axis row by row.

    The slices are at least `min_parts` (to bound temporaries) and one per core, run on the
    cores' streams in turn; `cache_sized` also makes them small enough for the CPU's cache
    (CACHE_ELEMENTS)."""
    streams = cpu_streams()
    first, axis = next((a, ax) for a, ax in zip(args, axes) if ax is not None)
    if streams and cache_sized:
        slices = ceil_div(first.size, CACHE_ELEMENTS)
        # as many slices per stream (3 slices on 2 streams would leave one stream idle a third)
        min_parts = max(min_parts, ceil_div(slices, len(streams)) * len(streams))
    return over_slices(fn, args, axes, max(min_parts, len(streams)), streams, out_axis)
