"""The reference's entropy-bound sampler (transformers `generation_diffusion_gemma.py`), as pure
MLX functions. One compiled graph per denoising step does all the vocabulary-sized work: the
final softcap, then one argmax, one exp and one block-sum pass give the entropy, an exact
inverse-CDF sample and the self-conditioning probabilities; everything after that is
canvas-sized. Its exp, tanh and softmax, and how the pass is sliced over the canvas, are the
backend's (backends/)."""

import secrets
from dataclasses import dataclass, fields
from functools import partial
from typing import Optional

import mlx.core as mx

from . import backends
from .backends import DEFAULT, Backend
from .checks import check_int, check_number, check_object
from .distributed import shared_seed
from .utils import ceil_div

# The reference's global defaults (DiffusionGemmaGenerationConfig._get_default_generation_params).
DEFAULTS = dict(
    max_tokens=256,
    max_denoising_steps=48,
    entropy_bound=0.1,
    t_min=0.4,
    t_max=0.8,
    stability_threshold=1,
    confidence_threshold=0.005,
)


# What each setting must be: (integer?, lowest value, lowest excluded?). Steps and tokens
# count from 1; zero is refused rather than replaced by a default.
LIMITS = dict(
    max_tokens=(True, 1, False),
    max_denoising_steps=(True, 1, False),
    entropy_bound=(False, 0, True),
    t_min=(False, 0, False),
    t_max=(False, 0, False),
    stability_threshold=(True, 0, False),
    confidence_threshold=(False, 0, True),
)


def check_setting(name: str, value, label: Optional[str] = None):
    """One sampler setting, finite and in range; `label` is how the message names it (the key
    of the file or request it came from)."""
    is_int, lo, lo_open = LIMITS[name]
    if is_int:
        return check_int(label or name, value, lo=lo)
    return check_number(label or name, value, lo=lo, lo_open=lo_open)


@dataclass
class SamplerSettings:
    max_tokens: int = DEFAULTS["max_tokens"]
    max_denoising_steps: int = DEFAULTS["max_denoising_steps"]
    entropy_bound: float = DEFAULTS["entropy_bound"]
    t_min: float = DEFAULTS["t_min"]
    t_max: float = DEFAULTS["t_max"]
    stability_threshold: int = DEFAULTS["stability_threshold"]
    confidence_threshold: float = DEFAULTS["confidence_threshold"]

    @classmethod
    def resolve(cls, generation_config: Optional[dict] = None, **overrides) -> "SamplerSettings":
        """Explicit arguments > the checkpoint's generation_config.json (null = unset) > the
        reference's global defaults. Every value is checked where it comes from, so a message
        names the key that was given (`max_new_tokens`, `sampler_config.entropy_bound`)."""
        gen = {k: v for k, v in (generation_config or {}).items() if v is not None}
        values = dict(DEFAULTS)
        if "max_new_tokens" in gen:
            values["max_tokens"] = check_setting(
                "max_tokens", gen["max_new_tokens"], "max_new_tokens"
            )
        sampler_cfg = gen.get("sampler_config")
        if sampler_cfg is not None:
            check_object("sampler_config", sampler_cfg)
            if sampler_cfg.get("entropy_bound") is not None:
                values["entropy_bound"] = check_setting(
                    "entropy_bound", sampler_cfg["entropy_bound"], "sampler_config.entropy_bound"
                )
        for f in fields(cls):
            if f.name in gen and f.name != "max_tokens":
                values[f.name] = check_setting(f.name, gen[f.name])
        for k, v in overrides.items():
            if v is not None:
                values[k] = check_setting(k, v) if k in LIMITS else v
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self):
        for f in fields(self):
            check_setting(f.name, getattr(self, f.name))
        if self.t_max <= self.t_min:
            raise ValueError(
                f"t_max must be greater than t_min (got t_max={self.t_max}, t_min={self.t_min})"
            )


SEED_MAX = 2**64 - 1


def check_settings(**values):
    """Each given setting on its own (None: not given), e.g. command-line flags before the
    model loads; how t_min and t_max relate is known only once every source is merged."""
    for name, value in values.items():
        if value is None:
            continue
        if name == "seed":
            check_int("seed", value, lo=0, hi=SEED_MAX)
        else:
            check_setting(name, value)


def random_key(seed: Optional[int] = None) -> mx.array:
    """The PRNG key of a generation: from `seed` (an integer in [0, 2**64)), else at random
    (rank 0's draw, where the model is split across ranks: they all draw the same noise)."""
    if seed is None:  # two keys made in the same instant still differ
        return mx.random.key(shared_seed(secrets.randbits(63)))
    return mx.random.key(check_int("seed", seed, lo=0, hi=SEED_MAX))


def temperature(steps_remaining: int, settings: SamplerSettings) -> float:
    """The reference's LinearTemperatureScheduleLogitsProcessor: steps count down N..1, so the
    first step runs at t_max and the last at t_min + (t_max - t_min) / N."""
    n = settings.max_denoising_steps
    return settings.t_min + (settings.t_max - settings.t_min) * (steps_remaining / n)


def entropy_accept(entropy: mx.array, bound) -> mx.array:
    """Accept the lowest-entropy positions while sum(entropy) - max(entropy) <= bound
    (EntropyBoundSampler.accept_canvas). entropy: (B, C) -> bool mask (B, C)."""
    order = mx.argsort(entropy, axis=-1)
    sorted_h = mx.take_along_axis(entropy, order, axis=-1)
    selected = (mx.cumsum(sorted_h, axis=-1) - sorted_h) <= bound
    rank = mx.argsort(order, axis=-1)
    return mx.take_along_axis(selected, rank, axis=-1)


def tempered_stats(logits: mx.array, temp, backend: Backend = DEFAULT):
    """From one max and one exp pass over the tempered logits x = logits / t: the unnormalized
    e = exp(x - max), its sum s (and the per-block sums it is made of, for the sampler), and
    the entropy in the form H = log s - sum(e * (x - max)) / s, where both terms shrink
    together for peaked rows (lse - sum(p * x) would cancel catastrophically there).
    Returns (argmax, e, s, blocks, entropy)."""
    logits = logits.astype(mx.float32)
    argmax = mx.argmax(logits, axis=-1)
    # max(x) is x at the argmax (t > 0): one pass over the vocabulary gives both.
    z = (logits - mx.take_along_axis(logits, argmax[..., None], axis=-1)) / temp
    e = backend.exp(z)
    s, blocks = _sum_with_blocks(e)
    entropy = mx.log(s[..., 0]) - (e * z).sum(axis=-1) / s[..., 0]
    return argmax.astype(mx.int32), e, s, blocks, entropy


def _block_size(V: int) -> int:
    """Vocabulary block for the two-level inverse CDF: a power of two dividing V (0: none)."""
    return next((b for b in (256, 128, 64, 32, 16, 8) if V % b == 0 and V > b), 0)


def _sum_with_blocks(e):
    """sum(e) over the vocabulary, and the per-block sums it is made of (None when the
    vocabulary has no block size): one pass serves the normalizer and the sampler."""
    b = _block_size(e.shape[-1])
    if not b:
        return e.sum(axis=-1, keepdims=True), None
    blocks = e.reshape(*e.shape[:-1], -1, b).sum(axis=-1)
    return blocks.sum(axis=-1, keepdims=True), blocks


def inverse_cdf_sample(e, blocks, target):
    """The first index whose running sum of e reaches `target` (u * s): an exact categorical
    draw from e / s with one uniform per position. Two levels (which block, then where in it)
    so that only one block per position is scanned, not a cumsum of the whole vocabulary."""
    V = e.shape[-1]
    if blocks is None:
        return mx.minimum((mx.cumsum(e, axis=-1) < target).sum(axis=-1), V - 1).astype(mx.int32)
    nb = blocks.shape[-1]
    b = V // nb
    cum = mx.cumsum(blocks, axis=-1)
    j = mx.minimum((cum < target).sum(axis=-1, keepdims=True), nb - 1)  # (..., 1)
    before = mx.take_along_axis(cum, j, axis=-1) - mx.take_along_axis(blocks, j, axis=-1)
    inside = mx.take_along_axis(e.reshape(*e.shape[:-1], nb, b), j[..., None], axis=-2)[..., 0, :]
    k = ((before + mx.cumsum(inside, axis=-1)) < target).sum(axis=-1, keepdims=True)
    return (j * b + mx.minimum(k, b - 1))[..., 0].astype(mx.int32)


def _position_pass(logits, temp, u, cap, probs_dtype, backend):
    """The vocabulary-sized work for some canvas positions: entropy, an inverse-CDF sample (one
    uniform draw `u` per position, not one per vocabulary entry; exact for softmax(x), as
    torch.multinomial is), the argmax and the next step's self-conditioning probabilities, all
    from one argmax, one exp and one block-sum pass, with the backend's exp and tanh.
    `cap`: the final softcap to apply first (None: the logits are final)."""
    if cap is not None:  # as the model's softcap: float32 tanh(logits / cap) * cap
        logits = backend.tanh(logits.astype(mx.float32) / cap) * cap
    argmax, e, s, blocks, entropy = tempered_stats(logits, temp, backend)
    sample = inverse_cdf_sample(e, blocks, u * s)
    # The reference casts the tempered logits to the embedding dtype before its float32
    # softmax; with float32 embeddings that is e / s.
    if probs_dtype == mx.float32:
        probs = e / s
    else:
        probs = self_conditioning_probs(logits, temp, probs_dtype, backend, argmax)
    return entropy, sample, argmax, probs


def _accept_pass(entropy, sample, argmax, bound, noise, pin_mask, pin_tokens):
    """Canvas-sized: acceptance, re-noising, pinned positions (zero entropy, so they spend none
    of the bound, and always kept)."""
    entropy = mx.where(pin_mask, 0.0, entropy)
    accept = entropy_accept(entropy, bound) | pin_mask
    canvas = mx.where(pin_mask, pin_tokens, mx.where(accept, sample, noise))
    return canvas, mx.where(pin_mask, pin_tokens, argmax), entropy, accept


_accept_compiled = mx.compile(_accept_pass)
_position_compiled = {}
# Vocabulary-sized temporaries are bounded by running the position pass over slices of the
# canvas of at most this many logits (64 positions at the real 262144 vocabulary).
CHUNK_ELEMENTS = 1 << 24


def self_conditioning_probs(logits, temp, dtype, backend: Backend = DEFAULT, argmax=None):
    """softmax of the tempered logits in `dtype`, the reference's self-conditioning input: it
    casts the tempered logits to the embedding dtype, softmaxes in float32 and casts again.
    `argmax` (where the maximum is) spares a backend that writes the softmax out a max pass:
    rounding to `dtype` keeps the order."""
    x = (logits.astype(mx.float32) / temp).astype(dtype).astype(mx.float32)
    return backend.softmax(x, argmax).astype(dtype)


def denoise_sample(
    logits,
    temp,
    bound,
    key,
    pin_mask=None,
    pin_tokens=None,
    probs_dtype=mx.float32,
    softcap: Optional[float] = None,
):
    """One step of the sampler on decoder logits (B, C, V): returns the next canvas (accepted
    samples, fresh uniform noise elsewhere), the argmax canvas, the per-position entropy of the
    tempered logits, the acceptance mask and the self-conditioning probabilities (in
    `probs_dtype`). `key`: one key, or a list of one per row. `temp` and `bound` are scalar
    arrays so the compiled graphs are reused across steps. `pin_mask` / `pin_tokens` (B, C) hold positions fixed (infilling).
    `softcap`: the model's final softcap when `logits` are the LM head's raw output (then it
    runs inside the same pass: no softcapped copy of the logits is written)."""
    B, C, V = logits.shape
    u, noise = draw_noise(key, B, C, V)
    return sample_canvas(logits, temp, bound, u, noise, pin_mask, pin_tokens, probs_dtype, softcap)


def split_keys(key):
    """mx.random.split of one key, or of each key in a list of per-row keys."""
    if not isinstance(key, list):
        return mx.random.split(key)
    pairs = [mx.random.split(k) for k in key]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def draw_noise(key, B: int, C: int, V: int):
    """The step's randomness: one uniform per position (B, C, 1) for the inverse-CDF sample and
    uniform tokens (B, C) for the positions re-noised. `key`: one key, or a list of one per row
    (then each row draws what it would alone)."""
    if isinstance(key, list):
        parts = [mx.random.split(k) for k in key]
        u = mx.concatenate([mx.random.uniform(shape=(1, C, 1), key=ks) for ks, _ in parts])
        noise = mx.concatenate(
            [mx.random.randint(0, V, (1, C), dtype=mx.int32, key=kn) for _, kn in parts]
        )
        return u, noise
    k_sample, k_noise = mx.random.split(key)
    u = mx.random.uniform(shape=(B, C, 1), key=k_sample)
    return u, mx.random.randint(0, V, (B, C), dtype=mx.int32, key=k_noise)


def sample_canvas(
    logits,
    temp,
    bound,
    u,
    noise,
    pin_mask=None,
    pin_tokens=None,
    probs_dtype=mx.float32,
    softcap: Optional[float] = None,
):
    """`denoise_sample` with its randomness drawn (`draw_noise`): pure, so it also runs inside
    a compiled step (step.py)."""
    B, C, V = logits.shape
    if pin_mask is None:
        pin_mask = mx.zeros((B, C), dtype=mx.bool_)
        pin_tokens = mx.zeros((B, C), dtype=mx.int32)
    backend = backends.selected()
    key_ = (probs_dtype, backend, bool(softcap))
    fn = _position_compiled.get(key_)
    if fn is None:
        if softcap:
            fn = partial(_position_pass, probs_dtype=probs_dtype, backend=backend)
        else:
            fn = partial(_position_pass, cap=None, probs_dtype=probs_dtype, backend=backend)
        fn = _position_compiled[key_] = mx.compile(fn)
    args = (logits, temp, u) + ((mx.array(softcap, dtype=mx.float32),) if softcap else ())
    chunks = ceil_div(B * C * V, CHUNK_ELEMENTS)
    entropy, sample, argmax, probs = backend.vocabulary_pass(
        fn, args, (1, None, 1, None)[: len(args)], min_parts=chunks
    )
    return (*_accept_compiled(entropy, sample, argmax, bound, noise, pin_mask, pin_tokens), probs)


def stop_update(history, argmax, entropy, confidence_threshold):
    """StableAndConfidentStoppingCriteria: stable when the argmax canvas equals each of the last
    `stability_threshold` ones (history: (S, B, C), -1 before any; S = 0 means always stable),
    confident when the mean entropy of the tempered logits is below the threshold.
    Returns (stop per row, updated history)."""
    if history is None or history.shape[0] == 0:
        stable = mx.ones(argmax.shape[:1], dtype=mx.bool_)
    else:
        stable = (history == argmax[None]).all(axis=(0, 2))
        history = mx.concatenate([history[1:], argmax[None]], axis=0)
    return stable & (entropy.mean(axis=-1) < confidence_threshold), history
