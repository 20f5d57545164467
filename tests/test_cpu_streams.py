"""Row-parallel CPU work gives what the unsplit call gives, bit for bit."""

import threading

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma import cpu_streams
from mlx_diffusiongemma.cpu_streams import row_parallel
from mlx_diffusiongemma.model import attention


def stats(x, t):
    z = x / t - mx.max(x / t, axis=-1, keepdims=True)
    e = mx.exp(z)
    return e.sum(axis=-1), mx.argmax(x, axis=-1), e


@pytest.mark.parametrize("n_streams", [0, 2, 3])
@pytest.mark.parametrize("min_parts", [1, 4, 50])
def test_row_parallel_is_exact(monkeypatch, n_streams, min_parts):
    streams = [mx.new_stream(mx.cpu) for _ in range(n_streams)]
    monkeypatch.setattr(cpu_streams, "cpu_streams", lambda: streams)
    x = mx.random.normal((2, 37, 300), key=mx.random.key(0)) * 5
    t = mx.array(0.7)
    whole = stats(x, t)
    split = row_parallel(stats, (x, t), (1, None), min_parts=min_parts)
    for a, b in zip(whole, split):
        assert a.shape == b.shape
        assert np.array_equal(np.array(a), np.array(b))


def test_row_parallel_passthrough_and_axes(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_streams, "cpu_streams", lambda: [mx.new_stream(mx.cpu)] * 2)

    def f(a, b):
        calls.append(a.shape)
        return a * b

    a, b = mx.arange(12.0).reshape(3, 4), mx.arange(4.0)
    out = row_parallel(f, (a, b), (0, None))
    assert calls == [(1, 4), (2, 4)] and np.array_equal(np.array(out), np.array(a * b))
    calls.clear()
    out = row_parallel(f, (a, a), (-1, -1))  # negative axes, both split
    assert calls == [(3, 2), (3, 2)] and np.array_equal(np.array(out), np.array(a * a))
    calls.clear()
    row_parallel(f, (a[:1], b), (0, None))  # one row: nothing to split
    assert calls == [(1, 4)]


def test_attention_split_over_queries_with_mask():
    q = mx.random.normal((2, 4, 9, 16), key=mx.random.key(1))
    k = mx.random.normal((2, 2, 20, 16), key=mx.random.key(2))
    v = mx.random.normal((2, 2, 20, 16), key=mx.random.key(3))
    mask = mx.random.uniform(shape=(2, 1, 9, 20), key=mx.random.key(4)) > 0.3
    mask = mask | (mx.arange(20) == 0)  # no empty rows
    for m in (mask, mask[:, :, :1], None):  # per query, broadcast over queries, none
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=m)
        assert np.array_equal(np.array(attention(q, k, v, m)), np.array(want))


def test_streams_per_thread():
    """The server runs MLX on a worker thread: it gets streams of its own, and they work."""
    if cpu_streams._core_count() < 2:
        pytest.skip("one core: no streams")
    main = cpu_streams.cpu_streams()
    got = {}

    def worker():
        got["streams"] = cpu_streams.cpu_streams()
        x = mx.random.normal((8, 64), key=mx.random.key(5))
        got["ok"] = np.array_equal(np.array(row_parallel(mx.exp, (x,), (0,))), np.array(mx.exp(x)))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert got["ok"] and got["streams"] is not main and len(got["streams"]) == len(main)
