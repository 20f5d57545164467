"""The default operations: what Metal and CUDA run (mx.fast, mlx-lm's switch layers, MLX's own
exp, tanh and softmax). The CPU backend (cpu.py) overrides some of them."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn


@partial(mx.compile, shapeless=True)
def softcap_fp32(logits, cap):
    """The final softcap in float32, as the reference: one fused pass over the vocabulary."""
    return mx.tanh(logits.astype(mx.float32) / cap) * cap


def over_slices(fn, args, axes, parts, streams=(), out_axis=None):
    """fn(*args) run on `parts` slices and concatenated along `out_axis` (default: the first
    split axis). Each arg whose entry in `axes` is an int is sliced along that axis; args with
    axis None are shared whole. fn must treat the split axis row by row. Slice i runs on
    streams[i % len(streams)] when streams are given, else on the default stream."""
    split = [(a, ax) for a, ax in zip(args, axes) if ax is not None]
    parts = min(parts, split[0][0].shape[split[0][1]])
    if parts < 2:
        return fn(*args)
    n = split[0][0].shape[split[0][1]]
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


class Backend:
    """Metal and CUDA: every op runs across the whole device already, and the fused kernels
    (mx.fast, gathered matmuls) are the fast route."""

    name = "metal/cuda"
    # Build denoising step t+1 before step t's stop test (generation.denoise_canvas): a step's
    # graph takes about as long to build in Python as the device takes to run one.
    prebuild_steps = True
    # Each denoising step replays one traced graph (step.py) instead of building it in Python.
    compile_steps = True
    # mx.fast's fused attention takes some head dims only: the vision tower zero-pads its own
    # to the next one it takes (vision.vision_attention).
    pads_head_dims = True
    # The dtype a training run loads its weights in (None: the checkpoint's own).
    train_dtype = None

    def setup(self):
        """Process-wide settings made once by `load_model`: none here."""

    # ---- model.py -------------------------------------------------------------------------
    def final_softcap(self, logits, cap: float):
        """tanh(logits / cap) * cap in float32 (the model's final softcap)."""
        return softcap_fp32(logits, mx.array(cap, dtype=mx.float32))

    def gelu_glu(self, gate, up, axis=-2):
        """gelu(gate, tanh approximation) * up; `axis` is the rows axis, along which a backend
        may split the work."""
        return nn.gelu_approx(gate) * up

    def attention(self, q, keys, values, mask):
        """Scaled dot-product attention with scale 1 (the q/k norms take its place)."""
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=1.0, mask=mask)

    def switch_matmul(self, linear, x, idx, sorted_indices: bool):
        """mlx-lm's (quantized) SwitchLinear: a gathered matmul over the experts `idx`."""
        return linear(x, idx, sorted_indices=sorted_indices)

    def experts(self, module, x, idx):
        """Each token's k experts, x (..., D), idx (..., k) -> (N, k, D): mlx-lm's layout, one row
        per (token, expert) sorted by expert (`Experts.sorted_rows`)."""
        return module.sorted_rows(x, idx)

    # ---- sampler.py (inside its compiled vocabulary pass) ---------------------------------
    def exp(self, x):
        return mx.exp(x)

    def tanh(self, x):
        return mx.tanh(x)

    def softmax(self, x, argmax=None):
        """softmax over the last axis; `argmax`: where the maximum is, when known."""
        return mx.softmax(x, axis=-1)

    def vocabulary_pass(self, fn, args, axes, min_parts: int = 1):
        """The sampler's pass over (B, C, V) logits: fn over at least `min_parts` slices of the
        canvas, one after the other (to bound the vocabulary-sized temporaries)."""
        return over_slices(fn, args, axes, min_parts)
