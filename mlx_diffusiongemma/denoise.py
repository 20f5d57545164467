"""The denoising loop of one canvas: the reference's entropy-bound sampler run step by step
against the prompt cache until every row is stable and confident (or out of steps)."""

from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import mlx.core as mx

from .backends import selected
from .cache import CanvasKV
from .model import Model
from .sampler import SamplerSettings, denoise_sample, split_keys, stop_update, temperature
from .step import CompiledStep
from .step import enabled as compiling


@dataclass
class Draft:
    """One denoising step of a canvas, for live views (see `draft_callback`)."""

    canvas: int
    step: int
    tokens: List[int]  # argmax canvas of this step (this row)
    accepted: List[bool]  # positions the sampler kept (the rest were re-noised)
    mean_entropy: float


@dataclass
class Pins:
    """Canvas positions held fixed while the rest is denoised (infilling): a (B, C) mask and
    the tokens at those positions."""

    mask: mx.array
    tokens: mx.array

    def filter(self, keep: List[int]) -> "Pins":
        """The pins of the rows `keep`."""
        idx = mx.array(keep, dtype=mx.int32)
        return Pins(self.mask[idx], self.tokens[idx])


@dataclass
class _Step:
    """One denoising step's (lazy) outputs, and the key the next step splits. The next step's
    self-conditioning signal comes from `probs`, or is `soft` already (the compiled step)."""

    canvas: mx.array
    argmax: mx.array
    entropy: mx.array
    accepted: mx.array
    probs: Optional[mx.array]
    finished: mx.array
    history: Optional[mx.array]
    key: Union[mx.array, List[mx.array]]
    soft: Optional[mx.array] = None

    def filter(self, keep: List[int]) -> "_Step":
        """The rows `keep` of this step: what the next step reads of them."""
        idx = mx.array(keep, dtype=mx.int32)
        history = None if self.history is None else self.history[:, idx]
        key = [self.key[j] for j in keep] if isinstance(self.key, list) else self.key
        return _Step(
            self.canvas[idx],
            self.argmax[idx],
            self.entropy[idx],
            self.accepted[idx],
            None if self.probs is None else self.probs[idx],
            self.finished[idx],
            history,
            key,
            None if self.soft is None else self.soft[idx],
        )


class CanvasSteps:
    """How `denoise_canvas` builds the steps of one canvas against `cache`: its K/V buffers
    (`kv`), and each step's graph, built op by op or, where the backend compiles steps (step.py:
    Metal and CUDA, unless switched off), replayed from one traced graph whose shapes the padded
    buffers hold still. The benchmarks time these same calls."""

    def __init__(self, model: Model, cache, canvas_len: int, settings: SamplerSettings):
        self.model, self.settings = model, settings
        backend = selected()
        first = cache[0] if isinstance(cache, list) else cache
        compiled = compiling(backend) and all(k is not None for k in first.keys)
        self.kv = CanvasKV(cache, canvas_len, padded=compiled)
        self.compiled = CompiledStep(model, self.kv, settings, backend) if compiled else None
        self.bound = mx.array(settings.entropy_bound, dtype=mx.float32)

    def build_step(self, canvas, soft, history, key, remaining, pins=None) -> _Step:
        """The step with `remaining` steps to go (the first: `soft` None, no signal yet)."""
        model, settings = self.model, self.settings
        temp = mx.array(temperature(remaining, settings), dtype=mx.float32)
        pin_mask, pin_tokens = (None, None) if pins is None else (pins.mask, pins.tokens)
        if self.compiled is not None:  # it splits the key itself
            canvas, argmax, entropy, accepted, finished, history, soft, key = self.compiled(
                canvas, soft, history, key, temp, pin_mask, pin_tokens
            )
            return _Step(canvas, argmax, entropy, accepted, None, finished, history, key, soft)
        key, sub = split_keys(key)
        logits = model.decode(canvas, self.kv, soft_embeds=soft, softcap=False)
        canvas, argmax, entropy, accepted, probs = denoise_sample(
            logits,
            temp,
            self.bound,
            sub,
            pin_mask,
            pin_tokens,
            model.embed_dtype,
            softcap=model.args.final_logit_softcapping,
        )
        finished, history = stop_update(history, argmax, entropy, settings.confidence_threshold)
        return _Step(canvas, argmax, entropy, accepted, probs, finished, history, key)

    def build_next_step(self, step: _Step, remaining: int, pins=None) -> _Step:
        """The step after `step`, self-conditioned on its probabilities."""
        soft = step.soft
        if soft is None:
            soft = self.model.soft_embeddings_from_probs(step.probs)  # self-conditioning
        return self.build_step(step.canvas, soft, step.history, step.key, remaining, pins)


def denoise_canvas(
    model: Model,
    cache,
    canvas: mx.array,
    settings: SamplerSettings,
    key,
    on_step: Optional[Callable] = None,
    pins: Optional[Pins] = None,
):
    """Runs the sampler on one canvas (B, C) against `cache`; returns (committed argmax canvas,
    steps taken). `key` is one key for the batch, or a list of one key per row: then each row
    draws its own noise, as it would alone (a server's rows equal their runs served alone).
    `on_step(steps, argmax, accepted, entropy, rows)` sees each step of the rows still going
    (`rows`: their indices in the batch) and may return indices of rows to stop now (clients
    that left); their result is whatever their canvas holds.

    Per step: decoder forward and one compiled sampler graph, then one host sync for the
    stable-and-confident stop test. The sampler's probabilities become the next step's
    self-conditioning signal (hidden-sized) only when a next step follows. A row that stops early
    keeps its result and leaves the batch (the reference freezes it and keeps computing it).

    Where the backend says so (`prebuild_steps`: Metal and CUDA) the next step's graph is built
    before waiting for this one (building a 30-layer graph in Python takes milliseconds, as long
    as a whole step there) and handed to the device once this step says it does not stop:
    nothing is computed that is not used. On the CPU the forward itself syncs (expert tiles), so
    it is built after the test.

    Where the backend compiles steps (step.py: Metal and CUDA, unless switched off) a step is
    one traced graph replayed, its self-conditioning embedding computed inside it; the prefix
    and the rows are padded to buckets so that the graph's shapes stay put."""
    B, C = canvas.shape
    S, N = settings.stability_threshold, settings.max_denoising_steps
    if pins is not None:
        pins = Pins(pins.mask, pins.tokens.astype(mx.int32))
        canvas = mx.where(pins.mask, pins.tokens, canvas)
    history = mx.full((S, B, C), -1, dtype=mx.int32) if S else None
    alive = list(range(B))  # original rows still denoising
    final = [None] * B
    builder = CanvasSteps(model, cache, C, settings)
    cache = builder.kv  # the prefix K/V, copied once for all steps of this canvas
    prebuild = selected().prebuild_steps

    def build_step(canvas, soft, history, key, remaining):
        return builder.build_step(canvas, soft, history, key, remaining, pins)

    def build_next_step(step, remaining):
        return builder.build_next_step(step, remaining, pins)

    step, steps = build_step(canvas, None, history, key, N), 0
    for remaining in range(N, 0, -1):
        nxt = saved = None
        if prebuild and remaining > 1:
            saved = cache.snapshot()
            nxt = build_next_step(step, remaining - 1)
        mx.eval(
            step.canvas,
            step.argmax,
            step.finished,
            *(() if step.history is None else (step.history,)),
        )
        steps += 1
        stopped = step.finished.tolist()
        if on_step is not None:  # first: what it reads would otherwise queue behind the next step
            drop = on_step(steps, step.argmax, step.accepted, step.entropy, list(alive))
            if drop:
                stopped = [f or alive[j] in drop for j, f in enumerate(stopped)]
        if nxt is not None and not any(stopped):
            saved = None  # not restored: the next step may write its K/V buffers in place
            mx.async_eval(nxt.canvas, nxt.argmax, nxt.finished)  # the device starts on it now
        if all(stopped) or remaining == 1:
            break
        if any(stopped):  # finished rows leave: they cost no more work
            keep = [j for j, f in enumerate(stopped) if not f]
            for j, f in enumerate(stopped):
                if f:
                    final[alive[j]] = step.argmax[j]
            if saved is not None:  # the prebuilt step is dropped: so are its K/V writes
                cache.restore(saved)
            step = step.filter(keep)
            cache.filter(keep)
            pins = None if pins is None else pins.filter(keep)
            alive = [alive[j] for j in keep]
            nxt = None  # it was built for every row: rebuilt for those left
        step = nxt if nxt is not None else build_next_step(step, remaining - 1)
    for j, r in enumerate(alive):
        final[r] = step.argmax[j]
    return mx.stack(final), steps
