"""Which backend runs what.

model.py, sampler.py and vision.py call the operations below and read the attributes below them,
and hold nothing backend-specific themselves. Each has one default, what Metal and CUDA run
(`Backend`, default.py); the CPU backend (`CpuBackend`, cpu.py) replaces some with routes of
its own:

  operation         Metal, CUDA (default.py)                 CPU (cpu.py)
  final_softcap     tanh(x / cap) * cap, one compiled pass   the same, one slice of rows per core
  gelu_glu          nn.gelu_approx(gate) * up                polynomial exp (cpu_math.py), in
                                                             cache-sized slices per core
                                                             (cpu_streams.py)
  attention         mx.fast.scaled_dot_product_attention     float32: matmul, polynomial softmax
                                                             in slices per core, matmul
  switch_matmul     mlx-lm's SwitchLinear                    non-float32 unquantized weights cast
                                                             to float32 (MLX's CPU gather_mm)
  experts           mlx-lm's layout (rows sorted by expert)  unquantized: expert-pure row tiles
                                                             (expert_tiles.py)
  exp, tanh,        mx.exp, mx.tanh, mx.softmax              polynomial exp (cpu_math.py)
  softmax (sampler)
  vocabulary_pass   canvas slices in turn (bounded           also one slice per core, each
                    temporaries)                             cache-sized (cpu_streams.py)
  prebuild_steps    yes: step t+1 is built before t's stop   no: the forward syncs with the host
                    test                                     (expert tile counts)
  compile_steps     yes: a step replays one traced graph     no: the forward syncs with the host
                    (step.py)
  setup (at load)   nothing                                  freed memory kept in the process
                                                             (cpu_memory.py; Linux/glibc)
  pads_head_dims    yes: the vision tower pads head dims     no: any head dim
                    mx.fast's attention does not take
  train_dtype       the checkpoint's                         float32 (MLX's CPU gather_mm)

The backend is chosen in one place, `select`, which `load_model` calls: the CPU's where the CPU
is MLX's default device, else the default. Until then (models built without the loader) it is
the one for the default device when this package was imported. The model calls the functions
below, which run the selected backend's op; the sampler takes the backend object itself
(`selected()`), since its compiled graphs are built per backend.
"""

from contextlib import contextmanager

import mlx.core as mx

from .cpu import CpuBackend
from .cpu_streams import one_stream
from .default import Backend

DEFAULT = Backend()  # Metal and CUDA
CPU = CpuBackend()

__all__ = [
    "Backend",
    "CpuBackend",
    "DEFAULT",
    "CPU",
    "for_device",
    "select",
    "selected",
    "using",
    "one_stream",
    "final_softcap",
    "gelu_glu",
    "attention",
    "switch_matmul",
    "experts",
]


def for_device(device) -> Backend:
    return CPU if device == mx.cpu else DEFAULT


_selected = for_device(mx.default_device())


def select(device=None) -> Backend:
    """Makes the backend for `device` (default: MLX's default device) the selected one."""
    global _selected
    _selected = for_device(mx.default_device() if device is None else device)
    return _selected


def selected() -> Backend:
    return _selected


@contextmanager
def using(backend: Backend):
    """Within this block `backend` is the selected one (tests, measurements); the previous
    selection is restored after."""
    global _selected
    previous, _selected = _selected, backend
    try:
        yield backend
    finally:
        _selected = previous


def final_softcap(logits, cap: float):
    """tanh(logits / cap) * cap in float32."""
    return _selected.final_softcap(logits, cap)


def gelu_glu(gate, up, axis=-2):
    """gelu(gate, tanh approximation) * up; `axis`: the rows axis."""
    return _selected.gelu_glu(gate, up, axis)


def attention(q, keys, values, mask):
    """Scaled dot-product attention with scale 1 (the q/k norms take its place)."""
    return _selected.attention(q, keys, values, mask)


def switch_matmul(linear, x, idx, sorted_indices: bool):
    """The gathered matmul of a (quantized) SwitchLinear over the experts `idx`."""
    return _selected.switch_matmul(linear, x, idx, sorted_indices)


def experts(module, x, idx):
    """An `Experts` module's outputs for each token's k experts: x (..., D), idx (..., k) ->
    (N, k, D) with N the tokens, in the row layout the backend runs fastest."""
    return _selected.experts(module, x, idx)
