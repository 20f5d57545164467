"""The CPU backend's operations: where MLX's CPU routes are slow, routes of its own built from
the modules beside this one (figures: benchmarks/RESULTS.md).

MLX's CPU exp and tanh are scalar and each stream runs on one core, so the elementwise passes
(softcap, GELUs, softmaxes) take the polynomial exp (cpu_math.py) in cache-sized row slices on
one stream per core (cpu_streams.py); its gathered matmul is one GEMM per batch element, so the
experts' rows go in expert-pure tiles (expert_tiles.py); freed memory is kept in the process
(cpu_memory.py). Training keeps this arithmetic (it is differentiable) on one stream
(`one_stream`)."""

import mlx.core as mx

from . import cpu_math
from .cpu_memory import keep_freed_memory
from .cpu_streams import row_parallel
from .default import Backend, softcap_fp32
from .expert_tiles import tile_rows, tiled_experts

# attention_cpu's score temporaries (a few arrays of this many float32s at most) are bounded by
# running it over blocks of queries: 64 MB each, where a 2048-token prefill chunk of a full-width
# full-attention layer would hold ~0.5 GB per array.
ATTENTION_CHUNK_ELEMENTS = 1 << 24


class CpuBackend(Backend):
    name = "cpu"
    # The forward syncs with the host (expert_tiles reads the per-expert counts), so a step
    # built ahead would overlap nothing: the next step is built after the stop test.
    prebuild_steps = False
    # A traced graph cannot read the expert tile counts on the host: steps are built each time.
    compile_steps = False
    pads_head_dims = False  # the CPU's attention takes any head dim
    # MLX's CPU gathered matmul takes float32 only: training casts once at load, not each step.
    train_dtype = mx.float32

    def setup(self):
        """Freed memory stays in the process (cpu_memory.py)."""
        keep_freed_memory()

    def final_softcap(self, logits, cap: float):
        """As the default, one slice of rows per core."""
        return row_parallel(softcap_fp32, (logits, mx.array(cap, dtype=mx.float32)), (-2, None))

    def gelu_glu(self, gate, up, axis=-2):
        """From the polynomial exp, in cache-sized slices along `axis` across the cores."""
        return row_parallel(cpu_math.gelu_glu, (gate, up), (axis, axis), cache_sized=True)

    def attention(self, q, keys, values, mask):
        """float32: `attention_cpu`; other dtypes mx.fast's."""
        if q.dtype == mx.float32:
            return attention_cpu(q, keys, values, mask)
        return super().attention(q, keys, values, mask)

    def switch_matmul(self, linear, x, idx, sorted_indices: bool):
        """As the default, except that unquantized non-float32 weights run in float32: MLX's CPU
        gathered matmul takes float32 only."""
        w = getattr(linear, "weight", None)  # None for LoRA-wrapped experts (they cast themselves)
        if w is None or hasattr(linear, "scales") or w.dtype == mx.float32:
            return linear(x, idx, sorted_indices=sorted_indices)
        y = mx.gather_mm(
            x.astype(mx.float32),
            w.astype(mx.float32).swapaxes(-1, -2),
            rhs_indices=idx,
            sorted_indices=sorted_indices,
        )
        return y.astype(x.dtype)

    def experts(self, module, x, idx):
        """Tiles of rows that share an expert (expert_tiles.py), where they pay: not for
        quantized experts, whose cost follows the rows, padding included."""
        E = module.gate_up_proj.num_experts
        tile = 0 if hasattr(module.gate_up_proj, "scales") else tile_rows(idx.size, E)
        if not tile:
            return module.sorted_rows(x, idx)
        return tiled_experts(
            x.reshape(-1, x.shape[-1]),
            idx.reshape(-1, idx.shape[-1]),
            lambda h, e: self.switch_matmul(module.gate_up_proj, h, e, True),
            lambda h, e: self.switch_matmul(module.down_proj, h, e, True),
            module.activation,
            E,
            tile,
        )

    def exp(self, x):
        return cpu_math.exp(x)

    def tanh(self, x):
        return cpu_math.tanh(x)

    def softmax(self, x, argmax=None):
        """Written out with the polynomial exp; the maximum taken at `argmax` when given."""
        if argmax is None:
            top = mx.max(x, axis=-1, keepdims=True)
        else:
            top = mx.take_along_axis(x, argmax[..., None].astype(mx.int32), axis=-1)
        e = cpu_math.exp(x - top)
        return e / e.sum(axis=-1, keepdims=True)

    def vocabulary_pass(self, fn, args, axes, min_parts: int = 1):
        """Also one slice per core, each small enough for the cache."""
        return row_parallel(fn, args, axes, min_parts=min_parts, cache_sized=True)


def attention_cpu(q, keys, values, mask):
    """The two matmuls whole on one stream (BLAS uses every core), the softmax from the
    polynomial exp in cache-sized row slices across the cores. mx.fast's CPU path is the same
    matmul / softmax / matmul, but its softmax uses MLX's scalar exp."""
    B, H, L, D = q.shape
    Hk, S = keys.shape[1], keys.shape[2]
    if mask is not None and mask.ndim == 3:  # (H | 1, L | 1, S)
        mask = mask[None]
    if mask is not None and mask.ndim == 4:  # (B | 1, H | 1, L | 1, S): heads grouped as the scores
        m = mask.shape
        mask = mask.reshape(m[0], Hk, H // Hk, *m[2:]) if m[1] == H else mx.expand_dims(mask, 2)
    q = q.reshape(B, Hk, H // Hk, L, D)
    keys_t, values = keys[:, :, None].swapaxes(-1, -2), values[:, :, None]
    per_query = B * H * S
    step = max(1, ATTENTION_CHUNK_ELEMENTS // per_query)
    outs = []
    for lo in range(0, L, step):
        m = mask
        if m is not None and m.ndim >= 2 and m.shape[-2] == L and L > step:
            m = m[..., lo : lo + step, :]
        outs.append(_attention_block(q[..., lo : lo + step, :], keys_t, values, m))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-2)
    return out.reshape(B, H, L, -1)


def _attention_block(q, keys_t, values, mask):
    s = q @ keys_t  # (B, Hk, H/Hk, L, S)
    if mask is not None:
        if mask.dtype == mx.bool_:
            s = mx.where(mask, s, mx.array(-mx.inf, dtype=s.dtype))
        else:
            s = s + mask.astype(s.dtype)
    shape = s.shape
    p = row_parallel(cpu_math.softmax, (s.reshape(-1, shape[-1]),), (0,), cache_sized=True)
    return p.reshape(shape) @ values
