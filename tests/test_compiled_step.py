"""The compiled denoising step (step.py) changes nothing in what comes out: seeded tokens equal
the uncompiled step's (one prompt, a batch, infilling, images, the server's rows), logits over a
padded prefix equal the unpadded ones, and a generation traces once per prefix bucket, never
within a canvas but when rows leave for a smaller bucket of rows. CI has no GPU: the tests run
the default (Metal/CUDA) backend's ops on the CPU, where compiling is forced on."""

import math
import os
import threading

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma import backends, batch_generate, load_model, step
from mlx_diffusiongemma.cache import CanvasKV, prefix_bucket, row_bucket
from mlx_diffusiongemma.denoise import Pins, SamplerSettings, denoise_canvas
from mlx_diffusiongemma.generation import stream_generate
from mlx_diffusiongemma.sampler import random_key
from mlx_diffusiongemma.serving.scheduler import Job, Scheduler


@pytest.fixture
def default_backend():
    """The Metal/CUDA ops (backends.DEFAULT), run on the CPU, for the test's duration."""
    with backends.using(backends.DEFAULT):
        yield


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny[0], dtype=mx.float32)


def both(fn):
    """fn() uncompiled and compiled (default backend), and the traces the compiled run made."""
    with step.compile_steps(False):
        plain = fn()
    before = step.traces()
    with step.compile_steps(True):
        compiled = fn()
    return plain, compiled, step.traces() - before


def tokens_of(responses):
    return [(r.tokens, r.steps, r.finish_reason) for r in responses]


def test_single_prompt_tokens_equal(model, default_backend):
    run = lambda: tokens_of(  # noqa: E731
        stream_generate(model, None, list(range(3, 40)), max_tokens=80, seed=5, eos_token_ids=[])
    )
    plain, compiled, traces = both(run)
    assert compiled == plain and len(plain) == 5 and traces >= 1


def test_new_weights_are_traced_again(tiny):
    """A compiled step holds the weights it was traced with as constants. Once the model's
    parameters are other arrays (adapters loaded, a fuse, a shard; here lazily computed ones) the
    next generation traces again, evaluates them first, and computes with them."""
    from mlx.utils import tree_map

    model = load_model(tiny[0], dtype=mx.float32)  # (selects the CPU backend: used after)
    run = lambda: tokens_of(  # noqa: E731
        stream_generate(model, None, list(range(3, 30)), max_tokens=40, seed=2, eos_token_ids=[])
    )
    with backends.using(backends.DEFAULT):
        first, first_compiled, first_traces = both(run)
        model.update(tree_map(lambda w: w * 1.5, model.parameters()))  # lazy: not evaluated
        plain, compiled, traces = both(run)
        again = both(run)[2]
        model.train()  # (LoRA dropout would be traced in)
        training = both(run)[2]
        model.eval()
    assert first_compiled == first and first_traces >= 1
    assert compiled == plain != first and traces >= 1
    assert again == 0  # the same arrays again: the traced step is replayed
    assert training >= 1


@pytest.mark.parametrize("t_max, confidence", [(0.05, 0.5), (0.01, 0.05)])
def test_single_prompt_with_stops_and_drafts_equal(model, default_backend, t_max, confidence):
    """Canvases that stop early at different steps (the stop test inside the graph, here with no
    stability history), EOS, and what a live view sees of every step."""

    def run():
        drafts = []
        out = tokens_of(
            stream_generate(
                model,
                None,
                [7, 8, 9, 10, 11],
                max_tokens=64,
                seed=11,
                eos_token_ids=[5],
                stability_threshold=0,
                confidence_threshold=confidence,
                max_denoising_steps=12,
                t_min=1e-4,
                t_max=t_max,
                draft_callback=lambda d: drafts.append((d.canvas, d.step, d.tokens, d.accepted)),
            )
        )
        return out, drafts

    plain, compiled, _ = both(run)
    assert compiled == plain
    assert any(steps < 12 for _, steps, _ in plain[0])


def test_batch_tokens_equal(model, default_backend):
    """Prompts of different lengths (left-padded, masked), three rows padded to four, rows
    leaving at EOS between canvases and stopping at different steps within one."""
    prompts = [list(range(3, 12)), list(range(20, 45)), [9, 8, 7]]
    run = lambda: (
        batch_generate(  # noqa: E731
            model, None, prompts, max_tokens=64, seed=2, eos_token_ids=[4, 9, 17]
        ).tokens
    )
    plain, compiled, _ = both(run)
    assert compiled == plain


def test_infill_tokens_equal(model, default_backend):
    C = model.args.canvas_length
    mask = np.zeros((1, C), bool)
    mask[0, [1, 2, 9]] = True
    tokens = np.zeros((1, C), np.int32)
    tokens[mask] = [11, 12, 13]
    pins = Pins(mx.array(mask), mx.array(tokens))
    run = lambda: tokens_of(  # noqa: E731
        stream_generate(model, None, [4, 5, 6], max_tokens=C, seed=0, pins=pins, eos_token_ids=[])
    )
    plain, compiled, _ = both(run)
    assert compiled == plain
    assert [plain[0][0][i] for i in (1, 2, 9)] == [11, 12, 13]


def test_images_tokens_equal(model, default_backend):
    from test_vision import random_image

    rng = np.random.default_rng(3)
    image = random_image(rng, 40, 40)
    run = lambda: tokens_of(  # noqa: E731
        stream_generate(
            model, None, [5, 6, 7], images=[image], max_tokens=32, seed=4, eos_token_ids=[]
        )
    )
    plain, compiled, _ = both(run)
    assert compiled == plain
    imgs = [[random_image(rng, 30, 60)], [random_image(rng, 40, 20)]]
    run = lambda: (
        batch_generate(  # noqa: E731
            model,
            None,
            [[5, 6], [7, 8, 9, 10]],
            images=imgs,
            max_tokens=32,
            seed=6,
            eos_token_ids=[],
        ).tokens
    )
    plain, compiled, _ = both(run)
    assert compiled == plain


class Recorder(Job):
    def __init__(self, prompt, seed, max_tokens=48):
        super().__init__(prompt, SamplerSettings(max_tokens=max_tokens), 1, seed)
        self.tokens, self.done = [], threading.Event()

    def on_tokens(self, row, tokens, finish):
        self.tokens += tokens
        return False

    def on_done(self, row, finish):
        self.done.set()

    def on_error(self, message):
        self.tokens = message
        self.done.set()


def test_server_rows_tokens_equal(model, default_backend):
    """The scheduler's rows: one-row caches of different lengths in one canvas (per-row offsets
    and keys), rows joining and leaving."""

    def run():
        sch = Scheduler(model, None, max_batch=4)
        sch.generator.eos = set()
        try:
            jobs = [
                Recorder(list(range(3, 3 + n)), seed=n, max_tokens=16 * (1 + n % 3))
                for n in (4, 9, 17)
            ]
            for job in jobs:
                sch.submit(job)
            for job in jobs:
                assert job.done.wait(120)
            return [job.tokens for job in jobs]
        finally:
            sch.stop()

    plain, compiled, _ = both(run)
    assert compiled == plain and all(isinstance(t, list) for t in plain)


@pytest.mark.parametrize("rows", [[19], [12, 30], [5, 19, 33]])
def test_padded_prefix_logits_equal_unpadded(model, default_backend, rows):
    """The decoder over a prefix padded to its bucket (and rows padded to a power of two) gives
    the logits of the unpadded prefix within 1e-6, float32; rows of different lengths are the
    server's one-row caches."""
    C, V = model.args.canvas_length, model.args.vocab_size
    caches = []
    for n in rows:
        cache = model.make_cache()
        model.encode(mx.array([list(range(3, 3 + n))], dtype=mx.int32), cache)
        caches.append(cache)
    cache = caches[0] if len(caches) == 1 else caches
    canvas = mx.random.randint(0, V, (len(rows), C), key=mx.random.key(0))
    soft = mx.random.normal((len(rows), C, model.args.hidden_size), key=mx.random.key(1))
    want = model.decode(canvas, CanvasKV(cache, C), soft_embeds=soft)
    padded = CanvasKV(cache, C, padded=True)
    B = row_bucket(len(rows))
    assert padded.padded_rows == B and padded.rows == len(rows)
    assert all(p == prefix_bucket(p) and p > 0 for p in padded.prefix_len)
    fill = mx.array(list(range(len(rows))) + [0] * (B - len(rows)))
    got = model.decode(canvas[fill], padded, soft_embeds=soft[fill])[: len(rows)]
    assert np.abs(np.array(got) - np.array(want)).max() <= 1e-6


def test_traces_once_per_prefix_bucket_never_within_a_canvas(tiny):
    """K canvases trace once per bucket of the prefix (O(log K)), each at a canvas's first step."""
    model = load_model(tiny[0], dtype=mx.float32)  # its own graphs: nothing traced yet
    C, K, prompt = model.args.canvas_length, 24, 5
    at = []
    before = step.traces()
    with backends.using(backends.DEFAULT), step.compile_steps(True):
        for _ in stream_generate(
            model,
            None,
            list(range(3, 3 + prompt)),
            max_tokens=K * C,
            seed=1,
            eos_token_ids=[],
            max_denoising_steps=3,
            draft_callback=lambda d: at.append((d.canvas, d.step, step.traces() - before)),
        ):
            pass
    traces = at[-1][2]
    within = [t1 - t0 for (c0, _, t0), (c1, _, t1) in zip(at, at[1:]) if c0 == c1]
    assert within and not any(within)  # steps after a canvas's first trace nothing
    buckets = {prefix_bucket(prompt + c * C) for c in range(K)}
    assert traces == len(buckets) <= 2 * math.log2(K) + 4 < K


def test_rows_leaving_retrace_once_per_bucket_of_rows(tiny, monkeypatch):
    """Rows stopping one by one (5 -> 1) trace at 8, 4, 2 and 1 rows: once per bucket."""
    from test_backend_paths import pinned_stop_rule

    model = load_model(tiny[0], dtype=mx.float32)
    limits = [2, 3, 4, 5, 6]
    pins, rule = pinned_stop_rule(model, limits)
    monkeypatch.setattr(step, "stop_update", rule)
    B, C = len(limits), model.args.canvas_length
    cache = model.encode(mx.array([list(range(3, 12))] * B), model.make_cache())
    canvas = mx.random.randint(0, model.args.vocab_size, (B, C), key=mx.random.key(1))
    before = step.traces()
    with backends.using(backends.DEFAULT), step.compile_steps(True):
        _, steps = denoise_canvas(
            model, cache, canvas, SamplerSettings(max_denoising_steps=8), random_key(2), pins=pins
        )
    assert steps == max(limits) and step.traces() - before == 4


def test_switches(model, monkeypatch):
    """On where the backend compiles steps (the default backend), never on the CPU backend;
    MLX_DIFFUSIONGEMMA_COMPILE=0 and compile_steps(False) turn it off."""
    assert step.enabled(backends.DEFAULT) and not step.enabled(backends.CPU)
    monkeypatch.setitem(os.environ, step.ENV, "0")
    assert not step.enabled(backends.DEFAULT)
    with step.compile_steps(True):
        assert step.enabled(backends.DEFAULT) and not step.enabled(backends.CPU)
    monkeypatch.delitem(os.environ, step.ENV)
    with step.compile_steps(False):
        assert not step.enabled(backends.DEFAULT)
    before = step.traces()
    with backends.using(backends.CPU), step.compile_steps(True):
        list(stream_generate(model, None, [3, 4], max_tokens=8, seed=0, max_denoising_steps=2))
    assert step.traces() == before  # the CPU backend builds its steps


def test_buckets():
    sizes = range(1, 20000)
    assert all(prefix_bucket(n) >= n for n in sizes)
    assert all(prefix_bucket(n) - n < max(16, prefix_bucket(n) / 3) for n in sizes)
    assert all(prefix_bucket(prefix_bucket(n)) == prefix_bucket(n) for n in sizes)
    assert {prefix_bucket(n) for n in range(4096, 8193)} == {4096, 6144, 8192}  # 2 per doubling
    assert [row_bucket(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]


def test_server_rows_leaving_mid_canvas(tiny, monkeypatch):
    """Rows of different prompt lengths (per-row offsets) stopping at different steps: their
    offsets leave with them; the CPU backend, the default one and the compiled step agree."""
    from test_backend_paths import pinned_stop_rule

    from mlx_diffusiongemma import denoise

    model = load_model(tiny[0], dtype=mx.float32)
    pins, rule = pinned_stop_rule(model, [2, 5, 3])
    monkeypatch.setattr(denoise, "stop_update", rule)
    monkeypatch.setattr(step, "stop_update", rule)
    caches = []
    for n in (5, 9, 14):
        cache = model.make_cache()
        model.encode(mx.array([list(range(3, 3 + n))]), cache)
        caches.append(cache)
    C, V = model.args.canvas_length, model.args.vocab_size
    canvas = mx.random.randint(0, V, (3, C), key=mx.random.key(1))
    keys = [mx.random.key(i) for i in range(3)]
    settings = SamplerSettings(max_denoising_steps=8)
    out = []
    for backend, compiled in (
        (backends.CPU, False),
        (backends.DEFAULT, False),
        (backends.DEFAULT, True),
    ):
        with backends.using(backend), step.compile_steps(compiled):
            final, steps = denoise_canvas(model, caches, canvas, settings, keys, pins=pins)
        out.append((np.array(final).tolist(), steps))
    assert out[0] == out[1] == out[2] and out[0][1] == 5
