"""exp, tanh, GELU and softmax for MLX's CPU backend, built from arithmetic that MLX's compiler
fuses.

MLX's CPU exp and tanh run one element at a time, and they dominate the sampler's vocabulary pass
(softcap and softmax), the GELUs and the attention softmax. Here exp is Cody-Waite range
reduction and a degree-7 Taylor polynomial (max relative error 1.0e-7, about 1 ulp; MLX's CPU exp
measured 1.6e-6), and tanh, GELU and softmax are written with it. MLX's compiled CPU graphs still
write some intermediates to memory, so these pay off on slices that stay in the L2 cache
(cpu_streams.CACHE_ELEMENTS). The CPU backend (cpu.py) uses them for the sampler, the GELUs and
the float32 attention; the model's final softcap outside the sampler stays mx.tanh. Speeds:
benchmarks/RESULTS.md.
"""

import math

import mlx.core as mx

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln 2 split so that n * _LN2_HI is exact for |n| < 2^11
_LN2_LO = 1.4286068203094173e-06
_EXP_MIN, _EXP_MAX = -87.33654, 88.72284  # beyond: 0 (below normal floats) and inf


def exp(x):
    x = x.astype(mx.float32)
    c = mx.clip(x, _EXP_MIN, _EXP_MAX)
    n = mx.floor(c * _LOG2E + 0.5)
    r = (c - n * _LN2_HI) - n * _LN2_LO  # |r| <= ln2 / 2
    p = r * (1.0 / 5040) + 1.0 / 720
    for coef in (1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * r + coef
    # n reaches 128 just below _EXP_MAX, past the largest float32 power of two: fold the last
    # factor 2 into p (measured 2x faster than splitting 2^n in two shifted halves)
    n = mx.stop_gradient(n).astype(mx.int32)  # piecewise constant (and the bit cast has no vjp)
    p = mx.where(n > 127, p * 2.0, p)
    y = p * _pow2(mx.minimum(n, 127))
    y = mx.where(x > _EXP_MAX, mx.inf, y)
    return mx.where(x < _EXP_MIN, 0.0, y)  # also exp(-inf) = 0; NaN stays NaN


def _pow2(k):
    return mx.view(mx.left_shift(k + 127, 23), mx.float32)


def tanh(x):
    """1 - 2 / (exp(2x) + 1): absolute error ~1e-7 (the ulp of 1) for every x, which is what a
    float32 result near +-1 can hold; relative accuracy near 0 is not kept (the softcap needs
    none: its output is cap * tanh, whose float32 ulp is already ~cap * 1e-7 near the cap)."""
    return 1.0 - 2.0 / (exp(2.0 * x.astype(mx.float32)) + 1.0)


@mx.compile
def gelu_glu(gate, up):
    """gelu(gate, tanh approximation) * up, with 0.5 (1 + tanh(z)) written as 1 / (1 + exp(-2z))
    (the same function; no cancellation for large negative z)."""
    dt = gate.dtype
    g = gate.astype(mx.float32)
    z = math.sqrt(2 / math.pi) * (g + 0.044715 * g * g * g)
    return (g / (1.0 + exp(-2.0 * z)) * up.astype(mx.float32)).astype(dt)


@mx.compile
def softmax(x):
    """softmax over the last axis, with the polynomial exp."""
    e = exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
