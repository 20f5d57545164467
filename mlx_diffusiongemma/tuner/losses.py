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
from ..utils import ceil_div


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
    return max(1, ceil_div(response_len, canvas_length))


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
    L = ceil_div(longest, pad_to) * pad_to
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
    masks = decoder_masks(model, context, L, C)
    first = decode(model, noised, kv, context, masks, None)
    soft = soft_signal(model, first) * self_condition[:, None, None].astype(model.embed_dtype)
    h = decode(model, noised, kv, context, masks, soft)
    diffusion = head_cross_entropy(model, h, clean).mean(axis=1)

    if len(slices(B * (L - 1), model.args.vocab_size)) > 1:
        # a sliced head: its slices after the decoder's, not beside them (HEAD_SLICE_BYTES)
        hidden = mx.depends(hidden, diffusion)
    pairs = mx.arange(L - 1)[None] < (seq_len[:, None] - 1)  # (B, L - 1)
    ar_ce = head_cross_entropy(model, hidden[:, :-1], tokens[:, 1:]) * pairs
    ar = ar_ce.sum(axis=1) / pairs.sum(axis=1)
    return diffusion, ar


# float32 logits per slice of the LM head: 64 rows (positions of the batch) at the real
# vocabulary, where a row's logits are 1 MiB and one example of a 512-token prompt and a canvas
# scores 768 + 256 rows and reads 256 more for the self-conditioning signal. Whole, their logits,
# softmaxes and gradients were 2.6 GB of a LoRA step's peak; in 64-row slices, ~0.5 GB
# (benchmarks/RESULTS.md, fine-tuning). A small vocabulary's rows fit in one slice.
HEAD_SLICE_BYTES = 64 * 2**20


def slices(rows: int, vocab: int):
    """[start, stop) spans of the rows, each with at most HEAD_SLICE_BYTES of float32 logits;
    one span when all the rows' logits are within two slices' bytes (slicing a small head only
    costs time: measured 6% of a LoRA step at the mid benchmark shape, vocabulary 32768)."""
    if rows * vocab * 4 <= 2 * HEAD_SLICE_BYTES:
        return [(0, rows)]
    n = max(1, HEAD_SLICE_BYTES // (4 * vocab))
    return [(a, min(a + n, rows)) for a in range(0, rows, n)]


def in_turn(parts):
    """Slices of work made to run one after the other: each slice's input waits on the previous
    slice's result (mx.depends), so that only one slice's vocabulary-sized temporaries are alive
    (MLX would otherwise run independent slices side by side)."""
    out, prev = [], None
    for x, f in parts:
        if prev is not None:
            x = mx.depends(x, prev)
        prev = f(x)
        out.append(prev)
    return out


def head_cross_entropy(model, hidden: mx.array, targets: mx.array) -> mx.array:
    """Cross-entropy (B, T) of the LM head's softcapped float32 logits at `hidden` (B, T, D).

    The head runs over slices of rows (HEAD_SLICE_BYTES of logits each) in turn, and each
    slice's gradient with respect to its hidden states is taken there and then (a position's
    loss reads its own hidden state only, so its gradient is its cotangent times the gradient of its loss alone): no
    vocabulary-sized tensor outlives its slice, and the backward pass does not recompute the
    logits (the fused linear cross-entropy of Liger and Apple's cut cross-entropy, here with the
    head's own, possibly quantized, matmul). Without a gradient taken, the slices' gradients are
    still evaluated (each slice waits on the previous one's), which costs an evaluation one more
    head matmul. A head with trainable parameters (full fine-tuning, or an adapter on it)
    needs its own gradient: the whole-logits path."""
    head = model.model.decoder.embed_tokens if model.args.tie_word_embeddings else model.lm_head
    B, T, D = hidden.shape
    spans = slices(B * T, model.args.vocab_size)  # over the batch's rows, whatever B
    if len(spans) == 1 or head.trainable_parameters():
        return nn.losses.cross_entropy(model.lm_logits(hidden), targets)

    def loss_and_grad(h, t):
        return slice_loss_and_grad(model, h, t)

    @mx.custom_function
    def fused(h, t):
        done = in_turn(
            (h[:, a:b], lambda x, a=a, b=b: loss_and_grad(x, t[:, a:b])) for a, b in spans
        )
        return mx.concatenate([d[0] for d in done], 1), mx.concatenate([d[1] for d in done], 1)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        grad = outputs[1]  # d loss / d hidden, position by position
        return grad * cotangents[0][..., None].astype(grad.dtype), mx.zeros_like(primals[1])

    return fused(hidden.reshape(1, B * T, D), targets.reshape(1, B * T))[0].reshape(B, T)


def slice_loss_and_grad(model, x: mx.array, targets: mx.array):
    """Cross-entropy (B, t) of the softcapped float32 logits at x (B, t, D) and its gradient
    with respect to x, written out rather than differentiated so that a slice keeps few
    vocabulary-sized arrays alive (the raw logits, the softcap's tanh, the gradient)."""
    raw = model.lm_logits(x, softcap=False).astype(mx.float32)
    cap = model.args.final_logit_softcapping
    tanh = mx.tanh(raw / cap) if cap else None
    logits = tanh * cap if cap else raw
    lse = mx.logsumexp(logits, axis=-1, keepdims=True)
    loss = (lse - mx.take_along_axis(logits, targets[..., None], axis=-1))[..., 0]
    grad = mx.exp(logits - lse) - (mx.arange(logits.shape[-1]) == targets[..., None])
    if cap:
        grad = grad * (1 - tanh * tanh)  # d(cap * tanh(raw / cap)) / d raw
    grad = grad.astype(x.dtype)
    if model.args.tie_word_embeddings:
        return loss, model.embedding_matmul(grad)
    _, (dx,) = mx.vjp(lambda y: model.lm_logits(y, softcap=False), [x], [grad])
    return loss, dx


def soft_signal(model, hidden: mx.array) -> mx.array:
    """The self-conditioning signal of pass 1's final hidden states (B, C, D): the softmax of
    the LM head's logits, without gradient, times the embedding (which gets its gradient, as in
    the reference), in slices of rows taken in turn (HEAD_SLICE_BYTES)."""
    B, C, D = hidden.shape
    rows = hidden.reshape(B * C, D)
    parts = in_turn(
        (rows[a:b], lambda x: model.soft_embeddings(mx.stop_gradient(model.lm_logits(x))))
        for a, b in slices(B * C, model.args.vocab_size)
    )
    return mx.concatenate(parts).reshape(B, C, D)


def embed(model, ids: mx.array) -> mx.array:
    """Scaled token embeddings. As the reference's `nn.Embedding(padding_idx=pad_token_id)`,
    looking up the pad token gives its row no gradient."""
    h = model.embed(ids)
    pad = model.args.pad_token_id
    if pad is None:
        return h
    return mx.where((ids == pad)[..., None], mx.stop_gradient(h), h)


# The two loops below run the model's own `Layer`s, not `Model.encode` / `Model.decode_hidden`:
# training needs gradients through every K/V, and the inference path writes them where autodiff
# cannot follow (the prompt cache trims sliding layers chunk by chunk; CanvasKV writes each
# step's canvas K/V into its buffer in place). Here the encoder reads whole rows at once and
# the decoder concatenates, with per-example masks standing in for the trimming.
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
    """Decoder final-normed hidden states (B, C, D) for the canvas at positions context.. over the encoder's K/V."""
    dec = model.model.decoder
    h = dec.self_conditioning(embed(model, canvas), soft_embeds)
    for i, layer in enumerate(dec.layers):
        h, _ = layer(h, context, kv[i], masks[i], layer.layer_scalar)
    return dec.norm(h)
