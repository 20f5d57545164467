"""The CPU-only strategies (expert tiles, streams, polynomial exp/tanh, the CPU attention) stay off
other backends: with MLX reporting a GPU as the default device, load_model selects the default
backend, and generation takes mlx-lm's row layout, mx.exp / mx.tanh / nn.gelu_approx / mx.fast
attention and unsplit ops, and gives the same tokens as the CPU paths (the arrays still live on
the CPU: only the device MLX reports is changed)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma import backends, load_model
from mlx_diffusiongemma.backends import cpu as cpu_backend
from mlx_diffusiongemma.backends import cpu_math, cpu_streams, expert_tiles
from mlx_diffusiongemma.generation import stream_generate


def run(model):
    r = None
    for r in stream_generate(
        model,
        None,
        list(range(3, 40)),
        max_tokens=32,
        seed=3,
        eos_token_ids=[],
        max_denoising_steps=6,
        t_min=1e-4,
        t_max=2e-4,
    ):
        pass
    return r.tokens


@pytest.fixture
def restore_backend():
    """The selection a test makes (through load_model) does not outlive it."""
    with backends.using(backends.selected()):
        yield


def gpu_default(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    monkeypatch.setattr(cpu_streams._local, "streams", None, raising=False)


def test_gpu_default_takes_none_of_the_cpu_paths(tiny, monkeypatch, restore_backend):
    model = load_model(tiny[0], dtype=mx.float32)
    assert backends.selected() is backends.CPU
    cpu_tokens = run(model)
    used = []

    def spy(obj, name):
        orig = getattr(obj, name)
        monkeypatch.setattr(obj, name, lambda *a, **k: used.append(name) or orig(*a, **k))

    for name in vars(backends.CpuBackend):  # every op of the CPU backend
        if callable(getattr(backends.CPU, name)) and not name.startswith("__"):
            spy(backends.CPU, name)
    for mod, name in (
        (cpu_backend, "tiled_experts"),
        (cpu_backend, "attention_cpu"),
        (cpu_backend, "row_parallel"),
        (cpu_math, "exp"),
        (cpu_math, "tanh"),
        (cpu_math, "gelu_glu"),
        (cpu_math, "softmax"),
        (expert_tiles, "tile_layout"),
        (cpu_streams, "row_parallel"),
    ):
        spy(mod, name)
    monkeypatch.setattr(mx, "new_stream", lambda *a, **k: used.append("new_stream"))
    gpu_default(monkeypatch)
    model = load_model(tiny[0], dtype=mx.float32)  # the backend is chosen at load
    assert backends.selected() is backends.DEFAULT
    gpu_tokens = run(model)
    assert used == []
    assert gpu_tokens == cpu_tokens  # near-greedy: the two paths agree token for token


def pinned_stop_rule(model, limits):
    """(pins, stop rule) that stop row j of a batch after limits[j] steps: the limit is pinned
    at the canvas's first position, the steps so far are counted in the history."""
    from mlx_diffusiongemma.denoise import Pins

    B, C = len(limits), model.args.canvas_length

    def stop_after_limit(history, argmax, entropy, threshold):
        count = history[0, :, 1] + 1  # steps before this one (history starts at -1)
        history = mx.concatenate(
            [history[:, :, :1], mx.broadcast_to(count[None, :, None], history[:, :, 1:].shape)],
            axis=2,
        )
        return count + 1 >= argmax[:, 0], history

    mask = mx.zeros((B, C), dtype=mx.bool_).at[:, 0].add(mx.array(True))
    pins = Pins(
        mask, mx.zeros((B, C), dtype=mx.int32).at[:, 0].add(mx.array(limits, dtype=mx.int32))
    )
    return pins, stop_after_limit


@pytest.mark.parametrize("compiled", [True, False])
def test_prebuilt_steps_with_rows_leaving(tiny, monkeypatch, restore_backend, compiled):
    """Metal and CUDA build step t+1 before step t's stop test: with rows of a batch stopping at
    different steps (a stop rule driven by a pinned token: row j stops after limit[j] steps), the
    committed canvases and step count equal the CPU's step-by-step loop, with the step compiled
    (the rows padded to a power of two, then to a smaller one as they leave) or not."""
    from mlx_diffusiongemma import denoise, step
    from mlx_diffusiongemma.cache import CanvasKV
    from mlx_diffusiongemma.denoise import SamplerSettings, denoise_canvas

    model = load_model(tiny[0], dtype=mx.float32)
    limits = [2, 5, 3]
    B, C = len(limits), model.args.canvas_length
    pins, stop_after_limit = pinned_stop_rule(model, limits)
    monkeypatch.setattr(denoise, "stop_update", stop_after_limit)
    monkeypatch.setattr(step, "stop_update", stop_after_limit)  # traced into the compiled step
    settings = SamplerSettings(max_denoising_steps=8, stability_threshold=1)
    cache = model.encode(mx.array([list(range(3, 12))] * B), model.make_cache())

    def run():
        canvas = mx.random.randint(0, model.args.vocab_size, (B, C), key=mx.random.key(1))
        return denoise_canvas(model, cache, canvas, settings, mx.random.key(2), pins=pins)

    cpu_final, cpu_steps = run()
    gpu_default(monkeypatch)
    assert backends.select() is backends.DEFAULT
    restored = []
    real_restore = CanvasKV.restore
    monkeypatch.setattr(
        CanvasKV, "restore", lambda self, snap: restored.append(1) or real_restore(self, snap)
    )
    with step.compile_steps(compiled):
        gpu_final, gpu_steps = run()
    assert (
        len(restored) == 2
    )  # rows left twice with a step prebuilt: its K/V writes were taken back
    assert cpu_steps == gpu_steps == max(limits)
    assert np.array_equal(np.array(cpu_final), np.array(gpu_final))
