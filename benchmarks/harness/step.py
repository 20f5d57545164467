"""One denoising step as the loop runs it (per-canvas K/V buffers, decoder forward, sampler,
self-conditioning), timed as a whole or in parts; and whole generation at fixed steps."""

import contextlib
import time

from mlx_diffusiongemma.bench.shapes import NO_STOP

from .common import timeit


def _arrays(tree):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if isinstance(tree, mx.array):
        return [tree]
    try:
        return [v for _, v in tree_flatten(tree) if isinstance(v, mx.array)]
    except Exception:
        return []


@contextlib.contextmanager
def timed_calls(classes, acc, key=None):
    """Wraps `__call__` of the given module classes: inputs are evaluated first, then the call and
    its outputs, and the seconds are added to `acc[key(module)]` (default: the class name)."""
    import mlx.core as mx

    originals = {}

    def wrap(orig):
        def call(self, *a, **k):
            mx.eval(_arrays((a, k)))
            t = time.perf_counter()
            out = orig(self, *a, **k)
            mx.eval(_arrays(out))
            name = key(self) if key else type(self).__name__
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
            return out

        return call

    for cls in classes:
        if cls not in originals:
            originals[cls] = cls.__call__
            cls.__call__ = wrap(cls.__call__)
    try:
        yield acc
    finally:
        for cls, f in originals.items():
            cls.__call__ = f


def decoder_cache(cache, canvas_len):
    """What a denoising loop passes to `model.decode`: the per-canvas K/V buffers."""
    from mlx_diffusiongemma.cache import CanvasKV

    return CanvasKV(cache, canvas_len)


def kv_bytes(k, v):
    return (0 if k is None else k.nbytes) + (0 if v is None else v.nbytes)


def canvas_kv_layers(dcache):
    """Bytes of each layer's per-canvas K/V buffers."""
    return [kv_bytes(k, v) for k, v in zip(dcache.keys, dcache.values)]


def by_kind(values, args):
    """(the values of the sliding layers, those of the full-attention layers), from per-layer values."""
    return (
        [v for i, v in enumerate(values) if args.is_sliding(i)],
        [v for i, v in enumerate(values) if not args.is_sliding(i)],
    )


def sampler_inputs():
    """(temperature, entropy bound, key) of the measured steps."""
    import mlx.core as mx

    return mx.array(0.6, dtype=mx.float32), mx.array(0.1, dtype=mx.float32), mx.random.key(0)


def loop_decode(model, canvas, dcache, soft=None):
    """The decoder forward as the denoising loop runs it: raw LM-head logits (the sampler
    applies the final softcap in its own vocabulary pass)."""
    return model.decode(canvas, dcache, soft_embeds=soft, softcap=False)


def sample(model, logits, temp, bound, key, probs_dtype=None):
    """The sampler's outputs on `loop_decode`'s logits, as the loop calls it; the last one is
    the self-conditioning probabilities."""
    from mlx_diffusiongemma.sampler import denoise_sample

    cap = model.args.final_logit_softcapping
    dt = probs_dtype or model.embed_dtype
    return denoise_sample(logits, temp, bound, key, None, None, dt, softcap=cap)


def sampler_step(model, logits, temp, bound, key):
    """(next canvas, next step's soft embeddings), as the denoising loop computes them."""
    out = sample(model, logits, temp, bound, key)
    return out[0], model.soft_embeddings_from_probs(out[4])


def time_sampler(model, logits, n=3):
    """Seconds of the vocabulary-sized work of one denoising step outside the decoder forward:
    the compiled sampler step (softcap and self-conditioning probabilities included) and the
    (probs @ embedding) matmul. `logits`: from loop_decode."""
    import mlx.core as mx

    temp, bound, key = sampler_inputs()
    t_sample = timeit(lambda: mx.eval(sample(model, logits, temp, bound, key)), n)
    probs = sample(model, logits, temp, bound, key)[4]
    mx.eval(probs)
    t_matmul = timeit(lambda: mx.eval(model.soft_embeddings_from_probs(probs)), n)
    del probs
    t_step = timeit(lambda: mx.eval(sampler_step(model, logits, temp, bound, key)), n)
    out = dict(denoise_sample=t_sample, sc_matmul=t_matmul, sc_total=t_matmul, total=t_step)
    if model.embed_dtype != mx.bfloat16:
        # what a bf16 (e.g. quantized) checkpoint's sampler does: probabilities in bf16
        out["denoise_sample_bf16_probs"] = timeit(
            lambda: mx.eval(sample(model, logits, temp, bound, key, mx.bfloat16)), n
        )
    return out


def per_layer_times(model, canvas, dcache, soft=None):
    """Seconds of each decoder layer, and of the self-conditioning MLP, in one forward (outputs
    evaluated module by module)."""
    import mlx.core as mx

    ids = {id(l): i for i, l in enumerate(model.layers)}
    sc = model.model.decoder.self_conditioning
    acc = {}
    with timed_calls(
        [type(model.layers[0]), type(sc)],
        acc,
        key=lambda m: "sc" if m is sc else ids.get(id(m), -1),
    ):
        mx.eval(loop_decode(model, canvas, dcache, soft))
    return [acc.get(i, 0.0) for i in range(len(model.layers))], acc.get("sc", 0.0)


def time_lm_head(model, canvas, dcache, soft, n):
    """Seconds of the final norm and LM head on the decoder's last hidden state (the softcap is
    the sampler's)."""
    import mlx.core as mx

    h = model.decode_hidden(canvas, dcache, soft)
    mx.eval(h)
    return timeit(lambda: mx.eval(model.lm_logits(h, softcap=False)), n)


def fixed_steps(model, ids, max_tokens, steps, seed, **kwargs):
    """stream_generate at `steps` fixed denoising steps per canvas (early stop disabled, no EOS);
    returns its last response."""
    from mlx_diffusiongemma.generation import stream_generate

    r = None
    for r in stream_generate(
        model,
        None,
        ids,
        max_tokens=max_tokens,
        max_denoising_steps=steps,
        confidence_threshold=NO_STOP,
        eos_token_ids=[],
        seed=seed,
        **kwargs,
    ):
        pass
    return r
