"""Row-parallel CPU work gives what the unsplit call gives, bit for bit."""

import threading

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma.backends import cpu as cpu_backend
from mlx_diffusiongemma.backends import cpu_streams
from mlx_diffusiongemma.backends.cpu import attention_cpu as attention
from mlx_diffusiongemma.backends.cpu_streams import row_parallel


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


def _attention_f64(q, k, v, mask):
    q, k, v = (np.array(a).astype(np.float64) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q @ k.swapaxes(-1, -2)
    if mask is not None:
        m = np.array(mask)
        s = np.where(m, s, -np.inf) if m.dtype == bool else s + m
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("H,Hk,L,S", [(4, 2, 9, 20), (4, 4, 7, 13), (8, 1, 256, 300)])
@pytest.mark.parametrize("chunk", [None, 600])
def test_cpu_attention_masks(H, Hk, L, S, chunk, monkeypatch):
    """The CPU attention (softmax in slices across streams; the last shape makes several) against
    float64, for every mask form the model and mx.fast's signature allow; also in query blocks
    (a small ATTENTION_CHUNK_ELEMENTS)."""
    if chunk:
        monkeypatch.setattr(cpu_backend, "ATTENTION_CHUNK_ELEMENTS", chunk)
    q = mx.random.normal((2, H, L, 16), key=mx.random.key(1))
    k = mx.random.normal((2, Hk, S, 16), key=mx.random.key(2))
    v = mx.random.normal((2, Hk, S, 16), key=mx.random.key(3))
    mask = mx.random.uniform(shape=(2, 1, L, S), key=mx.random.key(4)) > 0.3
    mask = mask | (mx.arange(S) == 0)  # no empty rows
    per_head = mx.broadcast_to(mask, (2, H, L, S)) & (
        mx.arange(H)[:, None, None] + mx.arange(S) != 3
    )
    additive = mx.where(mask, 0.0, -1e9)
    for m in (mask, mask[:, :, :1], mask[0, 0], mask[0], per_head, per_head[0], additive, None):
        want = _attention_f64(q, k, v, m)
        got = np.array(attention(q, k, v, m))
        np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max(), rtol=0)
        fast = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=m))
        assert (
            np.abs(got - want).max() <= 2 * np.abs(fast - want).max() + 1e-6
        )  # as close as mx.fast


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
