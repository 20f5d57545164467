"""The CPU's tiled expert layout against mlx-lm's row layout (the reference parity tests run the
tiled path too: their canvases have 2-8 rows per expert)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma import model as M
from mlx_diffusiongemma.backends import cpu as cpu_backend
from mlx_diffusiongemma.backends.expert_tiles import (
    TILE_OVERHEAD_ROWS,
    TILE_SIZES,
    best_tile,
    tile_layout,
    tile_rows,
)
from mlx_diffusiongemma.config import ModelArgs


def make_experts(E, D, I, k, dtype=mx.float32, seed=0):
    args = ModelArgs.from_config(
        dict(
            model_type="diffusion_gemma",
            text_config=dict(
                hidden_size=D,
                moe_intermediate_size=I,
                num_experts=E,
                top_k_experts=k,
                num_hidden_layers=1,
                vocab_size=16,
                intermediate_size=8,
                num_attention_heads=1,
                num_key_value_heads=1,
                head_dim=8,
            ),
        )
    )
    mx.random.seed(seed)
    ex = M.Experts(args)
    ex.set_dtype(dtype)
    mx.eval(ex.parameters())
    return ex


def routing(N, E, k, seed, skew=0.0):
    rng = np.random.default_rng(seed)
    # skew > 0 piles the tokens onto few experts (one expert gets many tiles, most get none)
    logits = rng.standard_normal((N, E)) - skew * np.arange(E)
    idx = np.argsort(-logits, axis=-1)[:, :k]
    w = rng.uniform(size=(N, k)).astype(np.float32)
    return mx.array(idx.astype(np.uint32)), mx.array(w)


def rows_layout(ex, x, idx, w, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(cpu_backend, "tile_rows", lambda rows, experts: 0)
        return ex(x, idx, w)


@pytest.mark.parametrize(
    "E,k,N,skew",
    [
        (8, 2, 16, 0),
        (8, 2, 37, 0),
        (16, 4, 64, 0),
        (64, 8, 256, 0),
        (16, 1, 100, 0),
        (16, 4, 64, 3.0),
        (4, 4, 33, 0),
    ],
)
def test_tile_layout_is_a_placement(E, k, N, skew):
    idx, _ = routing(N, E, k, seed=N, skew=skew)
    src, tile_expert, dest, tile = tile_layout(idx, E, tile_rows(idx.size, E) or 4)
    src, tile_expert, dest = (np.array(a) for a in (src, tile_expert, dest))
    flat = np.array(idx).reshape(-1)
    A = flat.size
    assert sorted(dest.tolist()) == sorted(set(dest.tolist())) and len(dest) == A  # one row each
    assert (src[dest] == np.arange(A)).all()  # each assignment's row reads that assignment
    assert (tile_expert[dest // tile] == flat).all()  # ... and sits in a tile of its expert
    # exact tile count: each expert's rows fill ceil(count / tile) tiles, no dummies
    counts = np.bincount(flat, minlength=E)
    assert tile == best_tile(counts)
    assert len(tile_expert) == (-(-counts // tile)).sum()
    assert (np.diff(tile_expert.astype(np.int64)) >= 0).all()  # sorted, as the matmul is told


@pytest.mark.parametrize(
    "E,k,N,D,I,skew",
    [
        (8, 2, 16, 32, 16, 0),
        (16, 4, 64, 64, 32, 0),
        (16, 4, 200, 64, 32, 2.0),
        (32, 8, 256, 48, 24, 0),
        (8, 1, 50, 32, 16, 0),
    ],
)
def test_tiled_equals_rows(E, k, N, D, I, skew, monkeypatch):
    ex = make_experts(E, D, I, k)
    idx, w = routing(N, E, k, seed=E + N, skew=skew)
    assert tile_rows(idx.size, E) > 0
    x = mx.random.normal((1, N, D), key=mx.random.key(N))
    rows = rows_layout(ex, x, idx.reshape(1, N, k), w.reshape(1, N, k), monkeypatch)
    tiled = ex(x, idx.reshape(1, N, k), w.reshape(1, N, k))
    assert tiled.shape == rows.shape == (1, N, D)
    np.testing.assert_allclose(
        np.array(tiled), np.array(rows), atol=2e-6 * float(mx.abs(rows).max()), rtol=0
    )
    # Under mx.compile nothing can be evaluated: the tile count becomes its bound (dummy tiles).
    compiled = mx.compile(lambda a, i, g: ex(a, i, g))(x, idx.reshape(1, N, k), w.reshape(1, N, k))
    np.testing.assert_allclose(
        np.array(compiled), np.array(rows), atol=2e-6 * float(mx.abs(rows).max()), rtol=0
    )


def test_tiled_bfloat16_weights(monkeypatch):
    ex = make_experts(16, 64, 32, 4, dtype=mx.bfloat16)
    idx, w = routing(64, 16, 4, seed=3)
    x = mx.random.normal((64, 64), key=mx.random.key(1)).astype(mx.bfloat16)
    rows, tiled = rows_layout(ex, x, idx, w, monkeypatch), ex(x, idx, w)
    assert tiled.dtype == rows.dtype
    np.testing.assert_allclose(
        np.array(tiled.astype(mx.float32)),
        np.array(rows.astype(mx.float32)),
        atol=0.02 * float(mx.abs(rows).max()),
        rtol=0,
    )


def test_tile_rows_choice():
    assert tile_rows(15, 8) == 0 and tile_rows(16, 8) == 4  # from 2 rows per expert
    assert tile_rows(2048, 128) == 32 and tile_rows(512, 128) == 8 and tile_rows(10**6, 8) == 32


def test_best_tile_choice():
    # one tile per expert when every count fits a size with little padding
    assert best_tile([33, 40, 47, 30, 45]) == 48
    assert best_tile([16] * 10) == 16 and best_tile([2, 3, 1, 0, 4]) == 4
    # many rows per expert: the largest tiles (fewest calls)
    assert best_tile([1000, 900]) == 128
    # it is the argmin of the stated cost, over random counts
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.poisson(rng.uniform(1, 100), size=rng.integers(1, 130))
        cost = {T: (-(-counts // T)).sum() * (TILE_OVERHEAD_ROWS + T) for T in TILE_SIZES}
        assert cost[best_tile(counts)] == min(cost.values())


def test_gradients_through_tiles(monkeypatch):
    """Fine-tuning on the CPU differentiates through the tiled layout."""
    ex = make_experts(8, 16, 8, 2)
    idx, w = routing(32, 8, 2, seed=5)
    x = mx.random.normal((32, 16), key=mx.random.key(2))

    def loss(params, layout_rows):
        ex.update(params)
        out = rows_layout(ex, x, idx, w, monkeypatch) if layout_rows else ex(x, idx, w)
        return (out * out).sum()

    params = ex.trainable_parameters()
    g_rows = mx.grad(loss)(params, True)
    g_tiled = mx.grad(loss)(params, False)
    for name in ("gate_up_proj", "down_proj"):
        a, b = np.array(g_tiled[name]["weight"]), np.array(g_rows[name]["weight"])
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)
