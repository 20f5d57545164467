"""The Gemma 4 vision tower and the `embed_vision` projection, in MLX.

Mirrors transformers' `Gemma4VisionModel` and `DiffusionGemmaMultimodalEmbedder` (5.23); module
paths equal the checkpoint's key names (`model.encoder.vision_tower.*`, `...embed_vision.*`).
Input: `pixel_values` (B, max_patches, 3·p²) in [0, 1], each patch flattened (row, column,
channel), and `image_position_ids` (B, max_patches, 2) as (x, y), -1 for padding patches.
Output: one row per soft token of every image, in batch order, projected to the text width.
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .backends import attention, gelu_glu, selected
from .config import VisionArgs
from .layers import RMSNormNoScale

# mx.fast.scaled_dot_product_attention's fused kernels take these head dims; the tower's 72 is
# zero-padded to the next one (q·k and the softmax are unchanged, the padded output is cut off).
FUSED_HEAD_DIMS = (64, 80, 128)


class ClippableLinear(nn.Module):
    """A bias-free linear under a `.linear.` infix, clamping its input and output when the
    checkpoint uses clipped linears (bounds are checkpoint buffers)."""

    def __init__(self, args: VisionArgs, dims_in: int, dims_out: int):
        super().__init__()
        self.linear = nn.Linear(dims_in, dims_out, bias=False)
        self.clipped = args.use_clipped_linears
        if self.clipped:
            self.input_min = mx.array(-mx.inf)
            self.input_max = mx.array(mx.inf)
            self.output_min = mx.array(-mx.inf)
            self.output_max = mx.array(mx.inf)

    def __call__(self, x):
        if not self.clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        return mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))


class PatchEmbedder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, pixel_values, positions, padding):
        w = self.input_proj.weight
        x = (2 * (pixel_values - 0.5)).astype(w.dtype)  # the model's own normalisation to [-1, 1]
        h = self.input_proj(x)
        # The learned 2-D table is gathered by (x, y); padding patches (-1) get zero.
        clamped = mx.maximum(positions, 0)
        table = self.position_embedding_table
        pos = table[0][clamped[..., 0]] + table[1][clamped[..., 1]]  # (B, N, D)
        pos = mx.where(padding[..., None], mx.zeros((), dtype=pos.dtype), pos)
        return h + pos


def rope_2d_tables(positions, head_dim: int, theta: float, dtype):
    """cos / sin (B, N, 1, head_dim) of the axial 2-D RoPE: the first half of each head rotates
    by x, the second by y, each half as a standard rotate-half RoPE of head_dim / 2 dims."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, half, 2, dtype=mx.float32) / half))  # (half / 2,)
    angles = positions.astype(mx.float32)[..., None] * inv_freq  # (B, N, 2, half / 2)
    ax, ay = angles[..., 0, :], angles[..., 1, :]
    full = mx.concatenate([ax, ax, ay, ay], axis=-1)[:, :, None, :]  # (B, N, 1, head_dim)
    return mx.cos(full).astype(dtype), mx.sin(full).astype(dtype)


def apply_rope_2d(x, cos, sin):
    """x (B, N, H, D): rotate-half inside each half of the head dims."""
    q = x.shape[-1] // 4
    rotated = mx.concatenate(
        [-x[..., q : 2 * q], x[..., :q], -x[..., 3 * q :], x[..., 2 * q : 3 * q]], axis=-1
    )
    return x * cos + rotated * sin


def vision_attention(q, k, v, mask):
    """Bidirectional attention (scale 1) with padding keys masked. Where the backend's attention
    is mx.fast's (Metal, CUDA), head dims its fused kernel does not take are zero-padded to one
    it does; the CPU's takes any."""
    D = q.shape[-1]
    target = next((d for d in FUSED_HEAD_DIMS if d >= D), D)
    if not selected().pads_head_dims or target == D:
        return attention(q, k, v, mask)
    pad = [(0, 0)] * 3 + [(0, target - D)]
    out = attention(mx.pad(q, pad), mx.pad(k, pad), mx.pad(v, pad), mask)
    return out[..., :D]


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = args.head_dim
        D, eps = args.hidden_size, args.rms_norm_eps
        self.q_proj = ClippableLinear(args, D, self.n_heads * self.head_dim)
        self.k_proj = ClippableLinear(args, D, self.n_kv_heads * self.head_dim)
        self.v_proj = ClippableLinear(args, D, self.n_kv_heads * self.head_dim)
        self.o_proj = ClippableLinear(args, self.n_heads * self.head_dim, D)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.v_norm = RMSNormNoScale(eps)

    def __call__(self, x, cos, sin, mask):
        B, N, _ = x.shape
        q = self.q_proj(x).reshape(B, N, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, N, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, N, self.n_kv_heads, self.head_dim)
        q = apply_rope_2d(self.q_norm(q), cos, sin).transpose(0, 2, 1, 3)  # (B, H, N, hd)
        k = apply_rope_2d(self.k_norm(k), cos, sin).transpose(0, 2, 1, 3)
        v = self.v_norm(v).transpose(0, 2, 1, 3)
        out = vision_attention(q, k, v, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, N, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        D, F = args.hidden_size, args.intermediate_size
        self.gate_proj = ClippableLinear(args, D, F)
        self.up_proj = ClippableLinear(args, D, F)
        self.down_proj = ClippableLinear(args, F, D)

    def __call__(self, x):
        return self.down_proj(gelu_glu(self.gate_proj(x), self.up_proj(x)))


class VisionLayer(nn.Module):
    """Sandwich norms around attention and the GeGLU MLP, as Gemma4VisionEncoderLayer."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        D, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = VisionAttention(args)
        self.mlp = VisionMLP(args)
        self.input_layernorm = nn.RMSNorm(D, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(D, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(D, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(D, eps=eps)

    def __call__(self, x, cos, sin, mask):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [VisionLayer(args) for _ in range(args.num_hidden_layers)]


def soft_token_slots(positions: np.ndarray, k: int, length: int):
    """For each patch, the pooled slot it averages into (row-major over the pooled grid, as the
    reference's `_avg_pool_by_positions`), and which of the `length` slots of each image hold a
    patch: ((B, N) int, (B, length) bool). Host-side: positions come from the processor."""
    clamped = np.maximum(positions, 0)
    max_x = clamped[..., 0].max(axis=-1, keepdims=True) + 1
    kernel = clamped // k
    slots = kernel[..., 0] + (max_x // k) * kernel[..., 1]
    used = np.zeros((positions.shape[0], length), dtype=bool)
    np.put_along_axis(used, slots, True, axis=1)
    return slots, used


class VisionTower(nn.Module):
    """`Gemma4VisionModel`: patch embedder, bidirectional layers, k×k pooler, standardize."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = VisionEncoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))

    def __call__(self, pixel_values: mx.array, positions) -> mx.array:
        """(total soft tokens, width): every image's soft tokens, padding slots dropped."""
        args = self.args
        positions_np = np.asarray(positions).astype(np.int64)
        B, N, _ = positions_np.shape
        if positions_np.max(initial=0) >= args.position_embedding_size:
            raise ValueError(
                f"patch position {positions_np.max()} is beyond the tower's position "
                f"table ({args.position_embedding_size})"
            )
        k = args.pooling_kernel_size
        length = N // (k * k)
        positions = mx.array(positions_np.astype(np.int32))
        padding = (positions == -1).all(axis=-1)  # (B, N)
        h = self.patch_embedder(pixel_values, positions, padding)
        cos, sin = rope_2d_tables(positions, args.head_dim, args.rope_theta, h.dtype)
        mask = mx.logical_not(padding)[:, None, None, :]  # (B, 1, 1, N): padding keys hidden
        for layer in self.encoder.layers:
            h = layer(h, cos, sin, mask)
        h = mx.where(padding[..., None], mx.zeros((), dtype=h.dtype), h)
        if N != length:
            slots, used = soft_token_slots(positions_np, int(math.isqrt(N // length)), length)
            pooled = self._pool(h, slots, length, N // length).astype(h.dtype)  # (B, length, D)
        else:
            pooled, used = h, ~(positions_np == -1).all(axis=-1)
        # The sqrt(width) scale can pass float16's range: float32 until the final cast.
        pooled = pooled.astype(mx.float32) * math.sqrt(args.hidden_size)
        keep = np.nonzero(used.reshape(-1))[0]
        pooled = pooled.reshape(B * length, -1)[mx.array(keep.astype(np.int32))]
        if args.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(h.dtype)

    @staticmethod
    def _pool(h, slots: np.ndarray, length: int, k_squared: int):
        """Average of each slot's patches, in float32, as a scatter-add by slot."""
        B, N, D = h.shape
        flat = (slots + np.arange(B)[:, None] * length).reshape(-1)
        out = mx.zeros((B * length, D), dtype=mx.float32)
        out = out.at[mx.array(flat.astype(np.int32))].add(h.astype(mx.float32).reshape(B * N, D))
        return (out / k_squared).reshape(B, length, D)


class VisionEmbedder(nn.Module):
    """`embed_vision`: RMSNorm without scale, then a bias-free linear to the text width."""

    def __init__(self, args: VisionArgs, text_hidden: int):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNormNoScale(args.rms_norm_eps)
        self.embedding_projection = nn.Linear(args.hidden_size, text_hidden, bias=False)

    def __call__(self, x):
        return self.embedding_projection(self.embedding_pre_projection_norm(x))
