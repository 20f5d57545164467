"""One denoising step as the loop runs it (per-canvas K/V buffers, decoder forward, sampler,
self-conditioning), timed as a whole or in parts; and whole generation at fixed steps."""

import contextlib
import functools
import time

from .common import timeit
from .shapes import NO_STOP


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
    """What a denoising loop passes to `model.decode`: the per-canvas K/V buffers (CanvasKV) when
    this version of the model has them, else the prompt cache itself."""
    try:
        from ..cache import CanvasKV
    except ImportError:
        return cache
    return CanvasKV(cache, canvas_len)


def kv_bytes(k, v):
    return (0 if k is None else k.nbytes) + (0 if v is None else v.nbytes)


def canvas_kv_layers(dcache, n_layers):
    """Bytes of each layer's per-canvas K/V buffers, when the decoder cache has them."""
    keys, values = getattr(dcache, "keys", None), getattr(dcache, "values", None)
    if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != n_layers:
        return None
    return [kv_bytes(k, v) for k, v in zip(keys, values)]


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


@functools.lru_cache(maxsize=None)
def _takes(fn, name):
    """Whether fn has a parameter `name` (asked once: the answer is read inside timed calls)."""
    import inspect

    return name in inspect.signature(fn).parameters


def _takes_probs_dtype():
    from ..sampler import denoise_sample

    return _takes(denoise_sample, "probs_dtype")


def fused_softcap(model):
    """Whether this version's loop hands the sampler raw LM-head logits and the sampler applies
    the final softcap inside its vocabulary pass."""
    from ..sampler import denoise_sample

    return _takes(denoise_sample, "softcap") and _takes(type(model).decode, "softcap")


def loop_decode(model, canvas, dcache, soft=None):
    """The decoder forward as the denoising loop runs it: raw logits where the sampler applies
    the softcap, else the model's softcapped logits."""
    if fused_softcap(model):
        return model.decode(canvas, dcache, soft_embeds=soft, softcap=False)
    return model.decode(canvas, dcache, soft_embeds=soft)


def sampler_parts(model, logits, temp, bound, key):
    """The vocabulary-sized work of one denoising step as this version of the project does it:
    (sampler outputs, self-conditioning probabilities, the softmax that makes them or None when
    the sampler returns them itself). Newer samplers take the embedding dtype and return the
    probabilities; older ones leave a separate softmax to the loop."""
    from ..sampler import denoise_sample, self_conditioning_probs

    dt = model.embed_dtype
    if fused_softcap(model):  # `logits` from loop_decode: raw
        out = denoise_sample(
            logits, temp, bound, key, None, None, dt, softcap=model.args.final_logit_softcapping
        )
        return out, out[4], None
    if _takes_probs_dtype():
        out = denoise_sample(logits, temp, bound, key, None, None, dt)
        if len(out) >= 5:
            return out, out[4], None
    else:
        out = denoise_sample(logits, temp, bound, key)
    return (
        out,
        self_conditioning_probs(logits, temp, dt),
        (lambda: self_conditioning_probs(logits, temp, dt)),
    )


def sampler_step(model, logits, temp, bound, key):
    """(next canvas, next step's soft embeddings), as the denoising loop computes them."""
    out, probs, _ = sampler_parts(model, logits, temp, bound, key)
    return out[0], model.soft_embeddings_from_probs(probs)


def time_sampler(model, logits, n=3):
    """Seconds of the vocabulary-sized work of one denoising step outside the decoder forward:
    the compiled sampler step (with the softcap where fused), the self-conditioning softmax
    (where separate) and the (probs @ embedding) matmul. `logits`: from loop_decode."""
    import mlx.core as mx

    from ..sampler import denoise_sample

    temp, bound, key = sampler_inputs()
    t_sample = timeit(lambda: mx.eval(sampler_parts(model, logits, temp, bound, key)[0]), n)
    _, probs, softmax = sampler_parts(model, logits, temp, bound, key)
    t_probs = timeit(lambda: mx.eval(softmax()), n) if softmax is not None else 0.0
    mx.eval(probs)
    t_matmul = timeit(lambda: mx.eval(model.soft_embeddings_from_probs(probs)), n)
    del probs
    t_step = timeit(lambda: mx.eval(sampler_step(model, logits, temp, bound, key)), n)
    out = dict(
        denoise_sample=t_sample,
        sc_softmax=t_probs,
        sc_matmul=t_matmul,
        sc_total=t_probs + t_matmul,
        total=t_step,
    )
    if model.embed_dtype != mx.bfloat16 and _takes_probs_dtype():
        # what a bf16 (e.g. quantized) checkpoint's sampler does: probabilities in bf16
        cap = dict(softcap=model.args.final_logit_softcapping) if fused_softcap(model) else {}
        out["denoise_sample_bf16_probs"] = timeit(
            lambda: mx.eval(
                denoise_sample(logits, temp, bound, key, None, None, mx.bfloat16, **cap)
            ),
            n,
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
    """Seconds of the final norm, LM head and (where the sampler does not apply it) softcap on
    the decoder's last hidden state."""
    import mlx.core as mx

    h = model.decode_hidden(canvas, dcache, soft)
    mx.eval(h)
    kw = dict(softcap=False) if fused_softcap(model) else {}
    return timeit(lambda: mx.eval(model.lm_logits(h, **kw)), n)


def fixed_steps(model, ids, max_tokens, steps, seed, **kwargs):
    """stream_generate at `steps` fixed denoising steps per canvas (early stop disabled, no EOS);
    returns its last response."""
    from ..generation import stream_generate

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
