"""DiffusionGemma's training objective (Google's fine-tuning adapter, as NeMo reproduces it).

Per example: the response is cut into canvases of `canvas_length` (the last filled up with the
fill token, which is supervised too); one canvas is scored. Its positions were replaced with
probability t by tokens uniform over the vocabulary (the noise is drawn by the caller, so that a
batch is reproducible and the checks can feed the same noise to the reference). The canvas reads
the clean prompt and the clean canvases before it through the encoder's K/V, exactly as at
inference. Decoder pass 1 runs without self-conditioning and without gradient; pass 2 gets
pass 1's logits as its signal where the example's coin says so, else the zero signal (a zero soft
embedding, as the reference's `self_conditioning_mask`). The loss is the mean cross-entropy over
the scored canvas (no 1/t weight) plus `encoder_loss_weight` x the encoder's mean next-token
cross-entropy over prompt + response + fill; the batch loss is the mean over examples.

A batch is right-padded: every example keeps positions 0.. as alone, causal attention keeps
padding out of every real query, and the decoder's key mask keeps each canvas to its own context.
"""

from typing import List, NamedTuple, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..backends import one_stream


class Batch(NamedTuple):
    """A padded batch of examples; every field an mx.array, as mlx-lm's compiled step wants."""

    tokens: mx.array  # (B, L) int32: prompt + response + fill, right-padded with 0
    prompt_len: mx.array  # (B,) int32
    seq_len: mx.array  # (B,) int32: prompt + whole canvases
    canvas_index: mx.array  # (B,) int32: the scored canvas
    replace: mx.array  # (B, C) bool: positions of the scored canvas replaced by noise
    random_tokens: mx.array  # (B, C) int32: the noise tokens
    self_condition: mx.array  # (B,) bool: pass 2 gets pass 1's logits


def canvas_count(response_len: int, canvas_length: int) -> int:
    return max(1, -(-response_len // canvas_length))


def pack(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    canvas_length: int,
    fill_token: int,
    pad_to: int = 1,
) -> tuple:
    """(tokens (B, L), prompt_len (B,), seq_len (B,)) as numpy arrays: each response filled up
    to whole canvases with `fill_token`, each row right-padded to L (a multiple of `pad_to`)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("prompts and responses must be non-empty lists of the same length")
    rows = []
    for p, r in zip(prompts, responses):
        if not len(p):
            raise ValueError("an example has an empty prompt")
        n = canvas_count(len(r), canvas_length) * canvas_length
        rows.append(list(p) + list(r) + [fill_token] * (n - len(r)))
    longest = max(len(r) for r in rows)
    L = -(-longest // pad_to) * pad_to
    tokens = np.zeros((len(rows), L), dtype=np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    prompt_len = np.array([len(p) for p in prompts], dtype=np.int32)
    seq_len = np.array([len(r) for r in rows], dtype=np.int32)
    return tokens, prompt_len, seq_len


def diffusion_loss(
    model,
    prompts: List[List[int]],
    responses: List[List[int]],
    *,
    canvas_index,
    replace,
    random_tokens,
    self_condition,
    fill_token: int,
    encoder_loss_weight: float = 1.0,
) -> mx.array:
    """The batch loss (a float32 scalar) for token-id lists and the scored canvas's noise:
    canvas_index (B,), replace (B, C) bool, random_tokens (B, C) int32, self_condition (B,)."""
    C = model.args.canvas_length
    tokens, prompt_len, seq_len = pack(prompts, responses, C, fill_token)
    n_canvases = (seq_len - prompt_len) // C
    ci = np.asarray(canvas_index).reshape(-1)
    if ci.shape[0] != len(prompts) or (ci < 0).any() or (ci >= n_canvases).any():
        raise ValueError("canvas_index must give, per example, one of its response's canvases")
    batch = Batch(
        mx.array(tokens),
        mx.array(prompt_len),
        mx.array(seq_len),
        mx.array(ci.astype(np.int32)),
        mx.array(replace).astype(mx.bool_),
        mx.array(random_tokens).astype(mx.int32),
        mx.array(self_condition).astype(mx.bool_),
    )
    return batch_loss(model, batch, encoder_loss_weight)[0]


def batch_loss(model, batch: Batch, encoder_loss_weight: float = 1.0):
    """(loss, diffusion loss, encoder AR loss), each the mean over the batch's examples."""
    with one_stream():
        diffusion, ar = example_losses(model, batch)
    loss = (diffusion + encoder_loss_weight * ar).mean()
    return loss, diffusion.mean(), ar.mean()


def example_losses(model, batch: Batch):
    """Per-example (diffusion, AR) losses, each (B,) float32."""
    tokens, prompt_len, seq_len, canvas_index, replace, random_tokens, self_condition = batch
    B, L = tokens.shape
    C = replace.shape[1]
    context = prompt_len + canvas_index * C  # (B,): positions before the scored canvas
    positions = context[:, None] + mx.arange(C)[None]  # (B, C)
    clean = mx.take_along_axis(tokens, positions, axis=1)
    noised = mx.where(replace, random_tokens, clean)

    hidden, kv = encode(model, tokens)
    pairs = mx.arange(L - 1)[None] < (seq_len[:, None] - 1)  # (B, L - 1)
    ar_logits = model.lm_logits(hidden[:, :-1])  # (B, L - 1, V) float32, softcapped
    ar_ce = nn.losses.cross_entropy(ar_logits, tokens[:, 1:]) * pairs
    ar = ar_ce.sum(axis=1) / pairs.sum(axis=1)

    masks = decoder_masks(model, context, L, C)
    first = mx.stop_gradient(decode(model, noised, kv, context, masks, None))
    soft = model.soft_embeddings(first) * self_condition[:, None, None].astype(model.embed_dtype)
    logits = decode(model, noised, kv, context, masks, soft)
    diffusion = nn.losses.cross_entropy(logits, clean).mean(axis=1)
    return diffusion, ar


def embed(model, ids: mx.array) -> mx.array:
    """Scaled token embeddings. As the reference's `nn.Embedding(padding_idx=pad_token_id)`,
    looking up the pad token gives its row no gradient."""
    h = model.embed(ids)
    pad = model.args.pad_token_id
    if pad is None:
        return h
    return mx.where((ids == pad)[..., None], mx.stop_gradient(h), h)


def encode(model, tokens: mx.array):
    """The encoder over whole right-padded rows in one causal pass: the final-normed hidden
    states (B, L, D) and every layer's (keys, values) (B, H, L, d), with gradients."""
    L = tokens.shape[1]
    q = mx.arange(L)[:, None]
    k = mx.arange(L)[None]
    causal = k <= q
    sliding = causal & (k > q - model.args.sliding_window)
    scalars = model.model.encoder.language_model.layers
    h = embed(model, tokens)
    kv = []
    for i, layer in enumerate(model.layers):
        mask = sliding if model.args.is_sliding(i) else causal
        h, layer_kv = layer(h, 0, None, mask, scalars[i].layer_scalar)
        kv.append(layer_kv)
    return model.model.decoder.norm(h), kv


def decoder_masks(model, context: mx.array, L: int, C: int):
    """Per layer, (B, 1, 1, L + C) keys the canvas sees: its own context (on sliding layers only
    the last `window - 1` positions of it, what the inference cache keeps) and the whole canvas."""
    j = mx.arange(L)[None]
    ctx = context[:, None]
    full = j < ctx
    window = full & (j >= ctx - (model.args.sliding_window - 1))
    canvas = mx.ones((context.shape[0], C), dtype=mx.bool_)
    out = {}
    for sliding, m in ((False, full), (True, window)):
        out[sliding] = mx.concatenate([m, canvas], axis=1)[:, None, None, :]
    return [out[model.args.is_sliding(i)] for i in range(len(model.layers))]


def decode(model, canvas, kv, context, masks, soft_embeds):
    """Decoder logits (B, C, V) for the canvas at positions context.. over the encoder's K/V."""
    dec = model.model.decoder
    h = dec.self_conditioning(embed(model, canvas), soft_embeds)
    for i, layer in enumerate(dec.layers):
        h, _ = layer(h, context, kv[i], masks[i], layer.layer_scalar)
    return model.lm_logits(dec.norm(h))
