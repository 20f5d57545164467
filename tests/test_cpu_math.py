"""The CPU's fused exp and GELU against float64."""

import math

import mlx.core as mx
import numpy as np

from mlx_diffusiongemma.backends import cpu_math


def test_exp_is_accurate_everywhere():
    x = np.concatenate(
        [
            np.linspace(-110, 89, 400001),
            np.random.default_rng(0).standard_normal(10000),
            [88.72, 88.7228, 88.73, 1e4, -87.3, -87.34, -1e4, 0.0, -0.0],
        ]
    ).astype(np.float32)
    got = np.array(mx.compile(cpu_math.exp)(mx.array(x)))
    want = np.exp(x.astype(np.float64))
    normal = (want > np.finfo(np.float32).tiny) & (want < np.finfo(np.float32).max)
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 2e-7  # ~1 ulp
    assert (got[want >= np.finfo(np.float32).max] == np.inf).all()
    assert (got[want <= np.finfo(np.float32).tiny] == 0).all()  # no denormals: flushed to 0
    special = np.array(cpu_math.exp(mx.array([-np.inf, np.inf, np.nan], dtype=mx.float32)))
    assert special[0] == 0 and special[1] == np.inf and np.isnan(special[2])


def test_gelu_glu_matches_the_tanh_formula():
    rng = np.random.default_rng(1)
    g = (rng.standard_normal((64, 48)) * 5).astype(np.float32)
    g[0, :4] = [-1e4, 1e4, 0.0, -30.0]
    u = rng.standard_normal((64, 48)).astype(np.float32)
    g64 = g.astype(np.float64)
    want = 0.5 * g64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (g64 + 0.044715 * g64**3))) * u
    got = np.array(cpu_math.gelu_glu(mx.array(g), mx.array(u)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    bf = cpu_math.gelu_glu(mx.array(g).astype(mx.bfloat16), mx.array(u).astype(mx.bfloat16))
    assert bf.dtype == mx.bfloat16


def test_gradients():
    """Fine-tuning on the CPU differentiates through them."""
    x = mx.array(np.linspace(-5, 5, 101).astype(np.float32))
    g = mx.grad(lambda a: cpu_math.exp(a).sum())(x)
    np.testing.assert_allclose(np.array(g), np.exp(np.array(x, dtype=np.float64)), rtol=1e-5)
    import mlx.nn as nn

    u = mx.ones_like(x)
    g1 = mx.grad(lambda a: cpu_math.gelu_glu(a, u).sum())(x)
    g2 = mx.grad(lambda a: (nn.gelu_approx(a) * u).sum())(x)
    np.testing.assert_allclose(np.array(g1), np.array(g2), atol=1e-5)


def test_tanh_absolute_error():
    x = np.concatenate(
        [np.linspace(-20, 20, 200001), [0.0, -0.0, 1e-30, 50.0, -50.0, 1e4, -1e4]]
    ).astype(np.float32)
    got = np.array(mx.compile(cpu_math.tanh)(mx.array(x)))
    assert np.max(np.abs(got - np.tanh(x.astype(np.float64)))) < 2.5e-7
    special = np.array(cpu_math.tanh(mx.array([np.inf, -np.inf], dtype=mx.float32)))
    assert (special == [1, -1]).all()
