"""Row-parallel work on the CPU backend: one MLX stream per core.

MLX's CPU backend runs a stream's ops one after another on that stream's thread, and only its
matmuls (BLAS) use more than one core. Its exp and tanh are scalar: ~65-75 M elements/s on a
2-core Xeon, so the vocabulary-sized passes of a denoising step (softcap, sampler), the GELUs and
the attention softmax (model.attention_cpu) keep one core busy while the other waits. Work that
is independent across rows is split here across one stream per core; MLX orders the streams by
their data dependencies. Measured on that Xeon: the sampler pass over a 256 x 32768 canvas 260 -> 143 ms,
a GELU over 2944 x 256 20 -> 13 ms. Results are bit-identical: each row's arithmetic is the same.

Metal and CUDA run each op across the whole device already: there `row_parallel` is just
`fn(*args)`.
"""

import os
import threading

import mlx.core as mx

from .backend import stream_splitting

MAX_STREAMS = 8
# Slices for `cache_sized` calls hold at most this many elements of the first split argument:
# MLX's compiled CPU graphs still write some intermediates to memory, and while they stay in the
# L2 cache (2 MB per core on the Xeon measured) the polynomial exp runs ~3x faster (cpu_math.py).
CACHE_ELEMENTS = 1 << 19
_local = threading.local()  # streams are made per thread (the server runs MLX on a worker thread)


def _core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_streams():
    """This thread's CPU streams (none with one core or off the CPU)."""
    if not stream_splitting():
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

    The slices are at least `min_parts` (to bound temporaries), and one per core on the CPU,
    where they run on the cores' streams in turn; `cache_sized` also makes them small enough
    for the CPU's cache (CACHE_ELEMENTS). Elsewhere they run one after the other."""
    streams = cpu_streams()
    split = [(a, ax) for a, ax in zip(args, axes) if ax is not None]
    first = split[0][0]
    n = first.shape[split[0][1]]
    if streams and cache_sized:
        slices = -(-first.size // CACHE_ELEMENTS)
        # as many slices per stream (3 slices on 2 streams would leave one stream idle a third)
        min_parts = max(min_parts, -(-slices // len(streams)) * len(streams))
    parts = min(max(min_parts, len(streams)), n)
    if parts < 2:
        return fn(*args)
    out_axis = split[0][1] if out_axis is None else out_axis
    outs = []
    for i in range(parts):
        lo, hi = i * n // parts, (i + 1) * n // parts
        sliced = [a if ax is None else _slice(a, ax, lo, hi) for a, ax in zip(args, axes)]
        if streams:
            with mx.stream(streams[i % len(streams)]):
                outs.append(fn(*sliced))
        else:
            outs.append(fn(*sliced))
    if isinstance(outs[0], tuple):
        return tuple(mx.concatenate(o, axis=out_axis) for o in zip(*outs))
    return mx.concatenate(outs, axis=out_axis)


def _slice(a, axis, lo, hi):
    index = [slice(None)] * a.ndim
    index[axis] = slice(lo, hi)
    return a[tuple(index)]
