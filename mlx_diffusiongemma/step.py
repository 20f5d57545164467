"""The denoising step as one compiled graph: the decoder forward against the canvas's prefix
K/V, the sampler, the stop test and the next step's self-conditioning embedding, traced once
(`mx.compile`) with the K/V buffers and the step's randomness as inputs and the model's
weights as constants of the trace, then replayed at every step. Building the step in Python
takes about as long as a GPU takes to run it; replaying the traced graph takes about a third of
that (fusion leaves half the operations, and MLX recreates each at a replay: RESULTS.md).

A traced graph is reused while its inputs keep their shapes. Within a canvas they do; across
canvases the prefix grows, so `CanvasKV(padded=True)` pads it to buckets (masked) and the rows
to powers of two: a generation traces a few times, at canvas boundaries or when rows leave for a
smaller bucket of rows. What comes out equals the uncompiled step's.

Where it runs: the backends that say so (`compile_steps`: Metal and CUDA). The CPU backend's
forward reads per-expert counts on the host (expert tiles), which a traced graph cannot. The
environment variable MLX_DIFFUSIONGEMMA_COMPILE=0, or `compile_steps(False)`, turns it off."""

import os
import weakref
from contextlib import contextmanager
from functools import partial
from typing import Optional

import mlx.core as mx

from .cache import CanvasKV
from .sampler import SamplerSettings, draw_noise, sample_canvas, split_keys, stop_update

ENV = "MLX_DIFFUSIONGEMMA_COMPILE"
_forced: Optional[bool] = None  # compile_steps(...) in effect, else None
_graphs: dict = {}  # id(model) -> {backend: (weights traced with, training, compiled step)}
_traces = 0  # times a step graph was traced in this process


@contextmanager
def compile_steps(enabled: Optional[bool]):
    """Within this block denoising steps are compiled (True; on a backend that compiles them),
    not compiled (False), or as the environment says (None)."""
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous


def enabled(backend) -> bool:
    """Whether denoising steps on `backend` run compiled."""
    if not backend.compile_steps:
        return False
    if _forced is not None:
        return _forced
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def traces() -> int:
    """How many times a step graph was traced in this process (tests, benchmarks)."""
    return _traces


def step_graph(model, backend):
    """The compiled step of `model` on `backend`, traced with the arrays the step reads
    (`Model.decoding_parameters`) as constants: a replay passes ~1,300 fewer inputs. It is made
    again when they are no longer those arrays (adapters loaded, a fuse, a shard: parameters are
    replaced, never written in place) or the model's training flag changed (LoRA dropout): a
    traced graph would otherwise keep computing with the old ones. mx.compile keeps its traced
    graphs per function, so the function lives as long as the model and these arrays."""
    per_model = _graphs.get(id(model))
    if per_model is None:
        per_model = _graphs[id(model)] = {}
        weakref.finalize(model, _graphs.pop, id(model), None)
    weights = model.decoding_parameters()
    traced = per_model.get(backend)
    if (
        traced is None
        or traced[1] != model.training
        or len(traced[0]) != len(weights)
        or any(a is not b for a, b in zip(traced[0], weights))
    ):
        per_model.pop(backend, None)  # the old trace and the arrays it holds go first
        # Evaluated first: a lazy weight would be traced as the graph that computes it, and
        # that graph replayed at every step.
        mx.eval(weights)
        fn = mx.compile(partial(_traced_step, weakref.ref(model)))
        traced = per_model[backend] = (weights, model.training, fn)
    return traced[2]


def key_graph(model, batch: int, per_row: bool, canvas_len: int):
    """The compiled `advance_key` for `batch` rows (one key, or one key per row)."""
    per_model = _graphs.get(id(model))  # made by step_graph
    fn = per_model.get(("keys", batch, per_row, canvas_len))
    if fn is None:
        fn = partial(advance_key, batch=batch, canvas_len=canvas_len, vocab=model.args.vocab_size)
        fn = per_model[("keys", batch, per_row, canvas_len)] = mx.compile(fn)
    return fn


def advance_key(key, batch: int, canvas_len: int, vocab: int):
    """The next step's key and this step's randomness, drawn from `key` as the uncompiled step
    draws them (`split_keys`, then `draw_noise` from the second half)."""
    key, sub = split_keys(key)
    return key, *draw_noise(sub, batch, canvas_len, vocab)


def _traced_step(
    model_ref,
    keys,
    values,
    masks,
    offset,
    canvas,
    soft,
    history,
    u,
    noise,
    temp,
    bound,
    confidence,
    pin_mask,
    pin_tokens,
):
    """One step, as `denoise_canvas` builds it uncompiled, with its inputs all arrays: runs only
    when mx.compile traces it. `soft` of zeros stands for no self-conditioning signal (its MLP
    gives exact zeros), an empty history (0, B, C) for no stability test."""
    global _traces
    _traces += 1
    model = model_ref()
    kv = CanvasKV.of_arrays(keys, values, masks, offset, canvas.shape[1])
    logits = model.decode(canvas, kv, soft_embeds=soft, softcap=False)
    canvas, argmax, entropy, accepted, probs = sample_canvas(
        logits,
        temp,
        bound,
        u,
        noise,
        pin_mask,
        pin_tokens,
        model.embed_dtype,
        softcap=model.args.final_logit_softcapping,
    )
    finished, history = stop_update(history, argmax, entropy, confidence)
    soft = model.soft_embeddings_from_probs(probs)  # the next step's self-conditioning
    return (canvas, argmax, entropy, accepted, finished, history, soft), kv.keys, kv.values


class CompiledStep:
    """The denoising steps of one canvas through the compiled graph. `kv` is the canvas's
    `CanvasKV(padded=True)`; each call replaces its buffers with the step's (lazy) ones, as the
    uncompiled step writes them in place."""

    def __init__(self, model, kv: CanvasKV, settings: SamplerSettings, backend):
        self.fn = step_graph(model, backend)
        self.model = model
        self.kv = kv
        self.bound = mx.array(settings.entropy_bound, dtype=mx.float32)
        self.confidence = mx.array(settings.confidence_threshold, dtype=mx.float32)
        self.hidden = (model.args.hidden_size, model.embed_dtype)
        self.fill = {}  # real rows -> the gather index that pads them to the buffers' rows
        self.blank = {}  # rows -> (no pins: mask, tokens; no stability history), made once

    def __call__(self, canvas, soft, history, key, temp, pin_mask=None, pin_tokens=None):
        """One step of the rows still going, `canvas` (B, C), drawing its randomness from `key`
        (one key or one per row, as `denoise_sample`). Returns (next canvas, argmax, entropy,
        accepted, finished, history, the next step's self-conditioning embedding, the next
        step's key)."""
        B, C = canvas.shape
        rows = self.kv.padded_rows
        key, u, noise = key_graph(self.model, B, isinstance(key, list), C)(key)
        if soft is None:
            soft = mx.zeros((B, C, self.hidden[0]), dtype=self.hidden[1])
        if history is None or pin_mask is None:
            blank = self.blank.get(B)
            if blank is None:
                blank = self.blank[B] = (
                    mx.zeros((B, C), dtype=mx.bool_),
                    mx.zeros((B, C), dtype=mx.int32),
                    mx.zeros((0, B, C), dtype=mx.int32),
                )
            if pin_mask is None:
                pin_mask, pin_tokens = blank[:2]
            if history is None:
                history = blank[2]
        inputs = [canvas, soft, u, noise, pin_mask, pin_tokens]
        if B < rows:  # rows left for a bucket that is not full: copies of row 0 fill it
            idx = self.fill.get(B)
            if idx is None:
                idx = self.fill[B] = mx.array(list(range(B)) + [0] * (rows - B), dtype=mx.int32)
            inputs = [a[idx] for a in inputs]
            history = history[:, idx]
        canvas, soft, u, noise, pin_mask, pin_tokens = inputs
        kv = self.kv
        out, kv.keys, kv.values = self.fn(
            kv.keys,
            kv.values,
            kv.masks,
            kv.offset,
            canvas,
            soft,
            history,
            u,
            noise,
            temp,
            self.bound,
            self.confidence,
            pin_mask,
            pin_tokens,
        )
        if B < rows:
            out = tuple(a[:, :B] if i == 5 else a[:B] for i, a in enumerate(out))
        return (*out, key)
