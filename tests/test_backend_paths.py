"""The CPU-only strategies (expert tiles, streams, polynomial exp/tanh, the CPU attention) stay off other backends:
with MLX reporting a GPU as the default device, generation takes mlx-lm's row layout, mx.exp /
mx.tanh / nn.gelu_approx / mx.fast attention and unsplit ops, and gives the same tokens as the CPU paths (the arrays
still live on the CPU: only the device MLX reports is changed)."""

import mlx.core as mx
import numpy as np

from mlx_diffusiongemma import cpu_math, cpu_streams, expert_tiles, load_model, model as model_mod
from mlx_diffusiongemma.generation import stream_generate


def run(model):
    r = None
    for r in stream_generate(model, None, list(range(3, 40)), max_tokens=32, seed=3, eos_token_ids=[],
                             max_denoising_steps=6, t_min=1e-4, t_max=2e-4):
        pass
    return r.tokens


def test_gpu_default_takes_none_of_the_cpu_paths(tiny, monkeypatch):
    model = load_model(tiny[0], dtype=mx.float32)
    cpu_tokens = run(model)
    used = []
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    for mod, name in ((model_mod, "tiled_experts"), (cpu_math, "exp"), (cpu_math, "tanh"),
                      (cpu_math, "gelu_glu"), (cpu_math, "softmax"), (model_mod, "attention_cpu"),
                      (expert_tiles, "tile_layout")):
        orig = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _n=name, _o=orig, **k: used.append(_n) or _o(*a, **k))
    monkeypatch.setattr(mx, "new_stream", lambda *a, **k: used.append("new_stream"))
    monkeypatch.setattr(cpu_streams._local, "streams", None, raising=False)
    gpu_tokens = run(model)
    assert used == []
    assert cpu_streams.cpu_streams() == []
    assert gpu_tokens == cpu_tokens  # near-greedy: the two paths agree token for token
