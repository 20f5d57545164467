"""DiffusionGemma in MLX: one set of Gemma 4 MoE weights used as a causal encoder (writing the
prompt KV cache) and as a bidirectional decoder (denoising a canvas against that cache).

Mirrors transformers' `modeling_diffusion_gemma.py` (5.23); module paths equal the checkpoint's
key names so Hugging Face and mlx-community files load without renaming. The few ops whose route
depends on the backend (attention, gated GELU, the experts' gathered matmuls, the final softcap)
come from backends/, which says which backend runs what.
"""

import math
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.pipeline import PipelineMixin
from mlx_lm.models.switch_layers import SwitchLinear

from .backends import attention, experts, final_softcap, gelu_glu, switch_matmul
from .cache import CanvasKV, PromptCache
from .config import ModelArgs
from .distributed import same_on_every_rank, shard_layer, spanning, sum_over_ranks
from .layers import RMSNormNoScale
from .vision import VisionEmbedder, VisionTower

VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
# The tower's linears sit under a `.linear.` infix (transformers' clippable linear).
CLIPPABLE = (".q_proj", ".k_proj", ".v_proj", ".o_proj", ".gate_proj", ".up_proj", ".down_proj")


def rope_periods(head_dim: int, params: dict) -> mx.array:
    """Per-pair rotation periods (1 / inv_freq) for `mx.fast.rope`, as the reference builds
    inv_freq: `default` rotates int(head_dim * partial_rotary_factor) dims; `proportional`
    spreads its frequencies over the whole head dim and leaves the rest unrotated (period inf)."""
    rope_type = params.get("rope_type", "default")
    base = params["rope_theta"]
    factor = params.get("factor", 1.0)
    prf = params.get("partial_rotary_factor", 1.0)
    if rope_type == "default":
        dim = int(head_dim * prf)
        if dim != head_dim:
            raise ValueError("default RoPE with partial_rotary_factor < 1 is not supported")
        exps = mx.arange(0, dim, 2, dtype=mx.float32) / dim
        return base**exps
    if rope_type == "proportional":
        angles = int(prf * head_dim // 2)
        exps = mx.arange(0, 2 * angles, 2, dtype=mx.float32) / head_dim
        rotated = factor * base**exps
        return mx.concatenate([rotated, mx.full((head_dim // 2 - angles,), mx.inf)])
    raise ValueError(f"unsupported rope_type {rope_type!r}")


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.is_sliding = args.is_sliding(layer)
        self.n_heads = args.num_attention_heads
        self.head_dim = args.layer_head_dims[layer]
        self.n_kv_heads = args.layer_kv_heads[layer]
        dim, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        # Full-attention layers have no v_proj: their values are the raw keys (k_eq_v).
        if self.is_sliding:
            self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.v_norm = RMSNormNoScale(args.rms_norm_eps)
        kind = "sliding_attention" if self.is_sliding else "full_attention"
        self._periods = rope_periods(self.head_dim, args.rope_parameters[kind])
        mx.eval(self._periods)  # materialized now: a lazy array is tied to its thread's stream

    def rope(self, x, offset):
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )

    def __call__(self, x, offset, prefix, mask):
        """x: (B, L, D). prefix: cached (keys, values) to attend to before this call's own, or
        a function (keys, values) -> what to attend to (the decoder's CanvasKV). Returns the
        output and the attended (keys, values), which the encoder caches."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim) if self.is_sliding else k
        k = self.rope(self.k_norm(k).transpose(0, 2, 1, 3), offset)
        v = self.v_norm(v).transpose(0, 2, 1, 3)
        q = self.rope(q.transpose(0, 2, 1, 3), offset)
        keys, values = k, v
        if callable(prefix):
            keys, values = prefix(k, v)
        elif prefix is not None and prefix[0] is not None:
            keys = mx.concatenate([prefix[0], k], axis=2)
            values = mx.concatenate([prefix[1], v], axis=2)
        out = attention(q, keys, values, mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out), (keys, values)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x):
        return self.down_proj(gelu_glu(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.top_k_experts
        self.eps = args.rms_norm_eps
        self.root = args.hidden_size**-0.5
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))

    def __call__(self, x):
        x = mx.fast.rms_norm(x, None, self.eps) * self.scale * self.root
        probs = mx.softmax(self.proj(x).astype(mx.float32), axis=-1)
        k = self.top_k
        # the choice of experts carries no gradient (as mlx-lm's MoE blocks)
        idx = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        w = w * self.per_expert_scale[idx].astype(mx.float32)
        return idx, w


def sort_by_expert(x, idx):
    """The (token, expert) rows of x (N, 1, D) ordered by expert, as mlx-lm's switch layers
    order them: (rows, their expert ids, the order that undoes the sort)."""
    k = idx.shape[-1]
    idx = idx.flatten()
    order = mx.argsort(idx)
    # (take_along_axis: one operation; idx[order] is a gather and a squeeze)
    return x[order // k], mx.take_along_axis(idx, order, axis=0), mx.argsort(order)


class Experts(nn.Module):
    """All experts as two stacked (gathered) matmuls: fused gate|up, then down."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.inter = args.moe_intermediate_size
        self.gate_up_proj = SwitchLinear(
            args.hidden_size, 2 * self.inter, args.num_experts, bias=False
        )
        self.down_proj = SwitchLinear(self.inter, args.hidden_size, args.num_experts, bias=False)

    def __call__(self, x, idx, weights):
        """x (..., D), each token's experts idx (..., k) and their weights (..., k)."""
        y = experts(self, x, idx)  # (N, k, D), in the backend's row layout (backends/)
        # Each view is one reshape (and the sum keeps its axis): every operation here is one
        # the host creates per layer per denoising step.
        weights = weights.reshape(*y.shape[:2], 1).astype(y.dtype)
        return (y * weights).sum(axis=-2, keepdims=True).reshape(x.shape)

    def activation(self, h):
        """gate|up halves -> the down projection's input; rows along the first axis."""
        return gelu_glu(h[..., : self.inter], h[..., self.inter :], axis=0)

    def sorted_rows(self, x, idx):
        """mlx-lm's layout: one row per (token, expert); Metal and CUDA gather these natively.
        x (..., D), idx (..., k) -> (N, k, D)."""
        k, D = idx.shape[-1], x.shape[-1]
        # Sorting rows by expert makes the gathered matmul read each expert's weights once.
        do_sort = idx.size >= 64
        if not do_sort:  # (N, 1, 1, D): each token against its k experts -> (N, k, 1, D)
            x, idx = x.reshape(-1, 1, 1, D), idx.reshape(-1, k)
            h = self.activation(switch_matmul(self.gate_up_proj, x, idx, False))
            return switch_matmul(self.down_proj, h, idx, False).squeeze(-2)
        x, sidx, inv = sort_by_expert(x.reshape(-1, 1, D), idx)
        h = self.activation(switch_matmul(self.gate_up_proj, x, sidx, True))
        y = switch_matmul(self.down_proj, h, sidx, True)  # (N * k, 1, D), sorted
        return y[inv].reshape(-1, k, y.shape[-1])  # back to (token, expert) order


class Layer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        D, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(D, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = nn.RMSNorm(D, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(D, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(D, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(D, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(D, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(D, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(D, eps=eps)
        # The decoder's scalar; the encoder passes its own (see EncoderLayerScalar).
        self.layer_scalar = mx.ones((1,))
        self.sharding_group = None  # tensor parallel: the ranks holding the rest of the MLPs

    def __call__(self, x, offset, prefix, mask, layer_scalar, kv_only=False):
        h, kv = self.self_attn(self.input_layernorm(x), offset, prefix, mask)
        if kv_only:  # the encoder's last layer: only its K/V are ever read
            return None, kv
        h = x + self.post_attention_layernorm(h)
        dense = self.mlp(self.pre_feedforward_layernorm(h))
        # The router reads the raw residual, the experts its pre_feedforward_layernorm_2 view.
        idx, w = self.router(h)
        moe = self.experts(self.pre_feedforward_layernorm_2(h), idx, w)
        if self.sharding_group is not None:  # each rank holds part of both sums
            dense, moe = sum_over_ranks(self.sharding_group, dense, moe)
        dense = self.post_feedforward_layernorm_1(dense)
        moe = self.post_feedforward_layernorm_2(moe)
        h = h + self.post_feedforward_layernorm(dense + moe)
        return h * layer_scalar.astype(h.dtype), kv


class SelfConditioning(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.hidden_size
        self.pre_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.post_norm = RMSNormNoScale(args.rms_norm_eps)
        self.gate_proj = nn.Linear(D, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(D, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, D, bias=False)

    def __call__(self, embeds, soft_embeds):
        # With no signal (first step) the MLP of zeros is exactly zero: skip it.
        if soft_embeds is not None:
            n = self.pre_norm(soft_embeds)
            embeds = embeds + self.down_proj(gelu_glu(self.gate_proj(n), self.up_proj(n)))
        return self.post_norm(embeds)


class Decoder(PipelineMixin, nn.Module):
    """The text layers. Pipelined (mlx-lm's PipelineMixin), a rank keeps a run of them (the
    others are None) and passes the hidden state on to the rank below it."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Layer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)
        self.pipeline_group = None

    def local_layers(self):
        """(index, layer) of the layers this rank runs."""
        return [(i, layer) for i, layer in enumerate(self.layers) if layer is not None]

    def receive(self, h):
        """The previous stage's output in place of h, unless this rank runs the first layers
        (rank size - 1, as mlx-lm orders the stages)."""
        if self.pipeline_rank < self.pipeline_size - 1:
            h = mx.distributed.recv_like(h, self.pipeline_rank + 1, group=self.pipeline_group)
        return h

    def send(self, h):
        """Sends h to the next stage; the send to evaluate, or None on the last stage."""
        if self.pipeline_rank == 0:
            return None
        return mx.distributed.send(h, self.pipeline_rank - 1, group=self.pipeline_group)

    def finish(self, h):
        """The last stage's output, on every rank (an all_gather, as mlx-lm's models)."""
        if self.pipeline_size == 1:
            return h
        sent = self.send(h)
        h_all = mx.distributed.all_gather(h if sent is None else sent, group=self.pipeline_group)
        return h_all[: h.shape[0]]


class EncoderLayerScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer_scalar = mx.ones((1,))


class EncoderLanguageModel(nn.Module):
    """The encoder shares every weight with the decoder except its per-layer scalars."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [EncoderLayerScalar() for _ in range(args.num_hidden_layers)]


class Encoder(nn.Module):
    """The encoder's own weights: its layer scalars and, unless the checkpoint is text-only, the
    vision tower and the projection of its soft tokens to the text width."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.language_model = EncoderLanguageModel(args)
        if args.vision is not None:
            self.vision_tower = VisionTower(args.vision)
            self.embed_vision = VisionEmbedder(args.vision, args.hidden_size)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = Decoder(args)
        self.encoder = Encoder(args)


def compute_dtype(embed) -> mx.Dtype:
    """The compute dtype of the (maybe quantized) embedding: mx-format modes (mxfp4, ...) keep
    uint8 scales, and their dequantized values come out in bfloat16."""
    if hasattr(embed, "scales"):
        return embed.scales.dtype if mx.issubdtype(embed.scales.dtype, mx.floating) else mx.bfloat16
    return embed.weight.dtype


class Model(nn.Module):
    """`DiffusionGemmaForBlockDiffusion` (text). `model(input_ids, decoder_input_ids)` is the
    reference forward; `encode` / `decode` / `soft_embeddings` are the pieces the sampler uses."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.embed_scale = math.sqrt(args.hidden_size)
        self.group = None  # the ranks the model is split over (shard / pipeline)
        self.path = None  # the checkpoint folder, set by load_model
        self.generation_config = {}  # the checkpoint's generation_config.json, set by load_model
        self.processor_config = {}  # its image processor's settings (max_soft_tokens), idem

    @property
    def layers(self):
        return self.model.decoder.layers

    def eos_token_ids(self) -> Optional[list]:
        """The checkpoint's end-of-turn ids: generation_config.json's, else config.json's
        (None: neither names any)."""
        eos = self.generation_config.get("eos_token_id", self.args.eos_token_id)
        return [eos] if isinstance(eos, int) else None if eos is None else list(eos)

    def sanitize(self, weights: dict) -> dict:
        """Maps checkpoint keys onto this model's parameter names. The encoder's text weights
        are the decoder's (tied): only its own layer_scalars are taken from the encoder tree."""
        args = self.args
        out = {}
        for key, value in weights.items():
            if "rotary_emb" in key:
                continue
            if key.startswith(VISION_PREFIXES):
                if args.vision is not None:
                    out[_vision_key(key)] = value
                continue
            if key.startswith("model.encoder.language_model."):
                if key.endswith(".layer_scalar"):
                    out[key] = value
                continue
            if key == "lm_head.weight" and args.tie_word_embeddings:
                continue
            if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                key += ".weight"
            out[key] = value
        return out

    def make_cache(self) -> PromptCache:
        n = self.args.num_hidden_layers
        return PromptCache([self.args.is_sliding(i) for i in range(n)], self.args.sliding_window)

    # ---- several processes (distributed.py) ----------------------------------------------
    def shard(self, group=None):
        """Tensor parallel over `group` (default: the launched one): attention by heads, the
        dense MLP and the experts by their intermediate width (`distributed.shard_layer`)."""
        group = group or mx.distributed.init()
        for _, layer in self.model.decoder.local_layers():
            shard_layer(layer, group)
        self.group = spanning(group)

    def pipeline(self, group=None, split=None):
        """Layers split across `group`: rank r keeps split[r] of them (default: even), rank 0
        the last ones, as mlx-lm's `PipelineMixin.pipeline`."""
        group = group or mx.distributed.init()
        self.model.decoder.pipeline(group, split)
        self.model.decoder.pipeline_group = group
        self.group = spanning(group)

    def embed(self, ids):
        """Token embeddings times sqrt(hidden), in the embedding's dtype."""
        emb = self.model.decoder.embed_tokens
        return emb(ids) * mx.array(self.embed_scale, dtype=compute_dtype(emb))

    # ---- vision --------------------------------------------------------------------------
    @property
    def has_vision(self) -> bool:
        """Whether the checkpoint has its vision tower (a text-only conversion has none)."""
        return "vision_tower" in self.model.encoder

    def image_features(self, pixel_values, image_position_ids) -> mx.array:
        """Soft tokens of a batch of images, projected to the text width: (total tokens, D).
        pixel_values (B, patches, 3·p²) in [0, 1], image_position_ids (B, patches, 2), -1 for
        padding, as the image processor makes them."""
        if not self.has_vision:
            raise ValueError(
                "this checkpoint has no vision tower (a text-only conversion): "
                "it cannot read images"
            )
        enc = self.model.encoder
        # float32 pixels: the tower normalises them before casting to its weights' dtype
        pixels = mx.array(pixel_values).astype(mx.float32)
        return enc.embed_vision(enc.vision_tower(pixels, image_position_ids))

    # ---- encoder -------------------------------------------------------------------------
    def encode(
        self,
        input_ids: mx.array,
        cache: PromptCache,
        step: int = 2048,
        mask: Optional[mx.array] = None,
        vision: Optional[dict] = None,
    ) -> PromptCache:
        """Causally encodes `input_ids` (B, L) after what `cache` holds, appending their K/V.
        `mask` (B, L) marks real tokens (False = padding, masked from every later query).
        `vision` maps a token id (image / video) to the features (n, D) written, in order
        (row-major over the batch), over the embeddings of that token; tokens of one run of
        such ids see each other both ways. Long inputs go in chunks of about `step`, never
        splitting a run; sliding layers keep `window - 1` positions, which is all any later
        query can see, so chunking gives the same cache as one pass."""
        L = input_ids.shape[1]
        places = self._vision_places(input_ids, vision)
        start = 0
        while start < L:
            end = self._chunk_end(places, start, step, L)
            chunk_mask = None if mask is None else mask[:, start:end]
            chunk = (
                None
                if places is None
                else [(f, ids[:, start:end], at[:, start:end]) for f, ids, at in places["feats"]]
            )
            runs = None if places is None else places["runs"][:, start:end]
            sent = self._encode_chunk(input_ids[:, start:end], cache, chunk_mask, chunk, runs)
            mx.eval(cache.state(), [] if sent is None else sent)
            start = end
        return cache

    def _vision_places(self, input_ids, vision):
        """Where each feature row goes, and the run of vision tokens each position lies in
        (-1: none), as the reference's `get_block_sequence_ids_for_mask`."""
        if not vision:
            return None
        ids = np.array(input_ids)
        feats = []
        for token, features in vision.items():
            hits = ids == token
            n = int(hits.sum())
            if n != features.shape[0]:
                raise ValueError(
                    f"the prompt has {n} tokens of id {token} for "
                    f"{features.shape[0]} image features"
                )
            at = np.maximum(np.cumsum(hits.reshape(-1)) - 1, 0).reshape(ids.shape)
            feats.append((features, mx.array(hits), mx.array(at.astype(np.int32))))
        is_vision = np.isin(ids, list(vision))
        starts = is_vision & ~np.pad(is_vision, ((0, 0), (1, 0)))[:, :-1]
        runs = np.where(is_vision, np.cumsum(starts, axis=1) - 1, -1)
        return {"feats": feats, "runs": runs, "is_vision": is_vision}

    @staticmethod
    def _chunk_end(places, start, step, L):
        """start + step, moved past the end of any run of vision tokens it would split."""
        end = min(start + step, L)
        if places is None:
            return end
        is_vision = places["is_vision"]
        while end < L and (is_vision[:, end - 1] & is_vision[:, end]).any():
            end += 1
        return end

    def _encode_chunk(self, ids, cache: PromptCache, pad_mask, vision=None, runs=None):
        T, L = cache.offset, ids.shape[1]
        if self.group is not None:  # ranks that encode different tokens would compute garbage
            same_on_every_rank(self.group, ids, vision)
        h = self.embed(ids)
        for features, hits, at in vision or ():
            # image features replace the token embeddings, without the text embed scale
            h = mx.where(hits[..., None], features[at].astype(h.dtype), h)
        block = None
        if runs is not None and (runs >= 0).any():
            r = mx.array(runs.astype(np.int32))
            block = (r[:, :, None] == r[:, None, :]) & (r[:, :, None] >= 0)  # (B, L, L)
        cache.add_validity(ids.shape, pad_mask)
        scalars = self.model.encoder.language_model.layers
        last = self.args.num_hidden_layers - 1
        dec = self.model.decoder
        h = dec.receive(h)
        for i, layer in dec.local_layers():
            P = cache.layer_len(i)
            mask = self._causal_mask(T, L, P, cache.is_sliding[i])
            if block is not None:
                # a run of image tokens is one bidirectional block, on every layer and past
                # the window; runs never span chunks, so cached keys are never in it
                pad = mx.zeros((block.shape[0], L, P), dtype=mx.bool_)
                mask = (mask | mx.concatenate([pad, block], axis=2))[:, None]
            if cache.valid is not None:
                # padded keys are hidden from every query but their own (no empty softmax rows)
                keys_valid = cache.valid[:, cache.valid.shape[1] - (P + L) :, None]
                own = mx.arange(T - P, T + L)[None, :] == mx.arange(T, T + L)[:, None]
                mask = mask & (keys_valid.swapaxes(1, 2)[:, None] | own)
            h, kv = layer(h, T, cache.fetch(i), mask, scalars[i].layer_scalar, kv_only=i == last)
            cache.store(i, *kv)
        cache.offset = T + L
        return dec.send(h)  # on to the next stage (the last one's last layer returns no h)

    def _causal_mask(self, T, L, P, sliding):
        """Queries at T..T+L-1 over keys at T-P..T+L-1: causal, and within the window for
        sliding layers (key > query - window, as transformers' sliding_window_overlay)."""
        q = mx.arange(T, T + L)[:, None]
        k = mx.arange(T - P, T + L)[None, :]
        mask = k <= q
        if sliding:
            mask = mask & (k > q - self.args.sliding_window)
        return mask

    # ---- decoder -------------------------------------------------------------------------
    def soft_embeddings(self, logits: mx.array) -> mx.array:
        """softmax(logits) @ embedding * embed_scale: the self-conditioning signal, hidden-sized."""
        dt = self.embed_dtype
        return self.soft_embeddings_from_probs(
            mx.softmax(logits.astype(mx.float32), axis=-1).astype(dt)
        )

    def soft_embeddings_from_probs(self, probs: mx.array) -> mx.array:
        dt = self.embed_dtype
        return self.embedding_matmul(probs.astype(dt)) * mx.array(self.embed_scale, dtype=dt)

    def embedding_matmul(self, x: mx.array) -> mx.array:
        """x (..., V) @ the token embedding (V, D), quantized or not: the soft embedding, and
        the tied LM head's transpose (the gradient at its input)."""
        emb = self.model.decoder.embed_tokens
        if hasattr(emb, "scales"):
            return mx.quantized_matmul(
                x,
                emb.weight,
                emb.scales,
                getattr(emb, "biases", None),
                transpose=False,
                group_size=emb.group_size,
                bits=emb.bits,
                mode=getattr(emb, "mode", "affine"),
            )
        return x @ emb.weight

    @property
    def embed_dtype(self):
        """The embedding's compute dtype: the self-conditioning probabilities' dtype."""
        return compute_dtype(self.model.decoder.embed_tokens)

    def decoding_parameters(self) -> list:
        """The arrays a denoising step reads: the decoder's and the LM head's (not the encoder's
        layer scalars or the vision tower)."""
        params = [self.model.decoder.parameters()]
        if not self.args.tie_word_embeddings:
            params.append(self.lm_head.parameters())
        return [v for _, v in tree_flatten(params)]

    def decode_hidden(self, canvas: mx.array, cache, soft_embeds=None) -> mx.array:
        """Bidirectional pass of the canvas over the cached prefix; the cache is not written.
        Sliding layers see the last `window - 1` cached positions (what the reference's sliding
        cache layer holds) plus the whole canvas; full layers see the whole prefix. `cache` is a
        PromptCache, or a CanvasKV made from one to reuse across the steps of a canvas."""
        if isinstance(cache, PromptCache):
            cache = CanvasKV(cache, canvas.shape[1])
        dec = self.model.decoder
        h = dec.receive(dec.self_conditioning(self.embed(canvas), soft_embeds))
        for i, layer in dec.local_layers():
            attend = partial(cache.attend, i)
            h, _ = layer(h, cache.offset, attend, cache.masks[i], layer.layer_scalar)
        return dec.norm(dec.finish(h))

    def lm_logits(self, h: mx.array, softcap: bool = True) -> mx.array:
        """float32 logits after the final softcap; with softcap=False the LM head's raw output
        in its own dtype (the sampler applies the softcap inside its vocabulary pass)."""
        if self.args.tie_word_embeddings:
            logits = self.model.decoder.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        if not softcap:
            return logits
        cap = self.args.final_logit_softcapping
        if cap:
            return final_softcap(logits, cap)
        return logits.astype(mx.float32)

    def decode(
        self, canvas, cache, self_conditioning_logits=None, soft_embeds=None, softcap: bool = True
    ) -> mx.array:
        if self_conditioning_logits is not None:
            soft_embeds = self.soft_embeddings(self_conditioning_logits)
        return self.lm_logits(self.decode_hidden(canvas, cache, soft_embeds), softcap)

    def __call__(
        self,
        input_ids,
        decoder_input_ids,
        self_conditioning_logits=None,
        pixel_values=None,
        image_position_ids=None,
    ):
        """Same call as the reference forward: encodes `input_ids` (with the images'
        soft tokens over its image tokens) into a fresh cache and returns float32 logits
        (batch, canvas, vocab) for `decoder_input_ids`."""
        vision = None
        if pixel_values is not None:
            feats = self.image_features(pixel_values, image_position_ids)
            vision = {self.args.image_token_id: feats}
        cache = self.encode(mx.array(input_ids), self.make_cache(), vision=vision)
        return self.decode(mx.array(decoder_input_ids), cache, self_conditioning_logits)


def _vision_key(key: str) -> str:
    """The tower's linears as `<proj>.linear.weight`, also from a layout without the infix."""
    path, name = key.rsplit(".", 1)
    if name == "weight" and key.startswith(VISION_PREFIXES[0]) and path.endswith(CLIPPABLE):
        return f"{path}.linear.{name}"
    return key
