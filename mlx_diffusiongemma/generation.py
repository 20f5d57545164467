"""`stream_generate`: a prompt to one response per committed canvas, through the canvas
generator; and what every caller shares on the way in (the prompt's ids, the EOS ids, the
sampler settings resolved in one place, the context check)."""

import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .denoise import Draft, Pins
from .generator import CanvasGenerator
from .model import Model
from .sampler import SamplerSettings, random_key
from .utils import ceil_div

# Keywords that shape the prompt (`prompt_ids`); every other keyword of the generation functions
# beyond their own is a sampler setting (`SamplerSettings`).
PROMPT_KEYWORDS = (
    "system_prompt",
    "enable_thinking",
    "apply_chat_template",
    "images",
    "videos",
    "image_soft_tokens",
)
SAMPLER_KEYWORDS = tuple(f.name for f in fields(SamplerSettings))


@dataclass
class GenerationResponse:
    """One committed canvas."""

    text: str  # the new text this canvas adds
    tokens: List[int]  # its tokens, cut before the first EOS
    canvas: int  # index of the canvas, from 0
    steps: int  # denoising steps it took
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int  # tokens generated so far
    generation_tps: float
    decoder_forwards: int  # denoising steps so far, all canvases
    tokens_per_forward: float  # generated tokens / decoder forwards, so far
    peak_memory: float  # GB
    finish_reason: Optional[str] = None  # "stop" (EOS), "length", or None while going on
    stop_token: Optional[int] = None  # the EOS id that ended the response


def prepare_prompt(
    tokenizer, prompt, system_prompt=None, enable_thinking=False, apply_chat_template=True
) -> List[int]:
    """Token ids for a string (through the chat template where the tokenizer has one, as the
    mlx-lm CLI does) or for a list of ids as given."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (pass token ids with tokenizer=None)")
        if apply_chat_template and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages.append({"role": "user", "content": prompt})
            text = tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=enable_thinking,
            )
            return list(tokenizer.encode(text, add_special_tokens=False))
        return list(tokenizer.encode(prompt))
    ids = [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


def prompt_ids(
    model: Model,
    tokenizer,
    prompt,
    images=None,
    videos=None,
    system_prompt=None,
    enable_thinking=False,
    apply_chat_template=True,
    image_soft_tokens=None,
):
    """(token ids, features per vision token id or None): `prepare_prompt`, or with images /
    videos their blocks laid out and encoded by the tower (multimodal.py)."""
    if not images and not videos:
        return prepare_prompt(
            tokenizer, prompt, system_prompt, enable_thinking, apply_chat_template
        ), None
    from .multimodal import vision_prompt

    vp = vision_prompt(
        model,
        tokenizer,
        prompt,
        images,
        videos,
        system_prompt,
        enable_thinking,
        apply_chat_template,
        image_soft_tokens,
    )
    return vp.ids, vp.vision


def eos_ids_for(model: Model, tokenizer, eos_token_ids=None) -> List[int]:
    """The ids that end a response: those given, else the checkpoint's, else the tokenizer's."""
    if eos_token_ids is None:
        eos_token_ids = model.eos_token_ids()
        if eos_token_ids is None and tokenizer is not None:
            eos_token_ids = list(getattr(tokenizer, "eos_token_ids", []) or [])
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    return sorted(set(int(e) for e in (eos_token_ids or [])))


def make_prompt_cache(model: Model):
    """A prompt cache to reuse across calls (chat sessions): pass it as `prompt_cache`."""
    return model.make_cache()


def resolve_settings(
    model: Model, settings: Optional[SamplerSettings] = None, **kw
) -> SamplerSettings:
    """The sampler settings a call runs with: keywords given (not None) > `settings` > the
    checkpoint's generation_config.json > the reference's globals."""
    if settings is not None:
        kw = {**asdict(settings), **{k: v for k, v in kw.items() if v is not None}}
    return SamplerSettings.resolve(model.generation_config, **kw)


def check_context(model: Model, n_prompt: int, cache_len: int, settings: SamplerSettings):
    """The prompt, what the cache holds and the canvases to generate fit the model's context."""
    args = model.args
    total = (
        cache_len
        + n_prompt
        + ceil_div(settings.max_tokens, args.canvas_length) * args.canvas_length
    )
    if total > args.max_position_embeddings:
        raise ValueError(
            f"prompt ({cache_len + n_prompt} tokens) plus {total - cache_len - n_prompt} generated tokens "
            f"exceeds the model's context of {args.max_position_embeddings}"
        )


def check_ids(model: Model, ids: Sequence[int]):
    """Every prompt id is in the vocabulary."""
    V = model.args.vocab_size
    if max(ids) >= V or min(ids) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {V})")


def split_keywords(model: Model, settings: Optional[SamplerSettings], kwargs: dict, prompt_keys):
    """The outer edge of the generation functions, in one place: their sampler keywords
    (mlx-lm style: `max_denoising_steps=`, `t_min=`, ...) merged over `settings` into one
    `SamplerSettings`, and the prompt keywords they accept (`prompt_keys`). Anything else is
    refused as Python refuses an unknown keyword."""
    sampler = {k: kwargs.pop(k) for k in SAMPLER_KEYWORDS if k in kwargs}
    unknown = [k for k in kwargs if k not in prompt_keys]
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return resolve_settings(model, settings, **sampler), kwargs


def stream_generate(
    model: Model,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    max_tokens: Optional[int] = None,
    *,
    settings: Optional[SamplerSettings] = None,
    seed: Optional[int] = None,
    draft_callback: Optional[Callable[[Draft], None]] = None,
    prompt_cache=None,
    initial_canvas=None,
    pins: Optional[Pins] = None,
    eos_token_ids=None,
    prefill_step_size: int = 2048,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Yields one `GenerationResponse` per committed canvas.

    Sampler settings: `settings` (one `SamplerSettings` a caller resolves once and passes on),
    with any of its fields given as keywords over it (`max_denoising_steps`, `entropy_bound`,
    `t_min`, `t_max`, `stability_threshold`, `confidence_threshold`), else the checkpoint's
    generation_config.json, else the reference's globals. Prompt keywords: `system_prompt`,
    `enable_thinking`, `apply_chat_template` (default True), and `images` (paths, URLs, data
    URLs, PIL images, arrays; they go where the chat template puts them, token-id prompts
    after the BOS unless the ids already hold their blocks), each with at most
    `image_soft_tokens` soft tokens (default: the checkpoint's), and `videos` (paths), laid
    out as Gemma 4 lays out video frames.

    `initial_canvas` gives the first canvas's starting tokens (the reference's
    `decoder_input_ids`); `pins` hold positions of the first canvas fixed (infilling);
    `draft_callback(Draft)` sees every denoising step. With a `prompt_cache` (from
    `make_prompt_cache`), `prompt` holds only the new tokens: they are encoded after what the
    cache holds, and when generation ends the response (up to and with its EOS) is encoded
    too, so the cache holds the whole conversation for the next turn."""
    kwargs["max_tokens"] = max_tokens
    settings, prompt_kw = split_keywords(model, settings, kwargs, PROMPT_KEYWORDS)
    ids, vision = prompt_ids(model, tokenizer, prompt, **prompt_kw)
    check_ids(model, ids)
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    check_context(model, len(ids), cache.offset, settings)
    eos = eos_ids_for(model, tokenizer, eos_token_ids)
    key = random_key(seed)
    C = model.args.canvas_length
    first = None
    if initial_canvas is not None:
        first = mx.array(initial_canvas, dtype=mx.int32).reshape(1, -1)
        if first.shape[1] != C:
            raise ValueError(f"initial_canvas must have {C} tokens (got {first.shape[1]})")

    mx.reset_peak_memory()
    tic = time.perf_counter()
    model.encode(mx.array([ids], dtype=mx.int32), cache, step=prefill_step_size, vision=vision)
    prompt_tps = len(ids) / max(time.perf_counter() - tic, 1e-9)

    generator = CanvasGenerator(model, eos, prefill_step_size)
    generator.insert(cache, settings, key, first_canvas=first, pins=pins, on_draft=[draft_callback])
    tic = time.perf_counter()
    all_tokens: List[int] = []
    forwards, text_so_far = 0, ""
    while len(generator):
        (r,) = generator.next()
        forwards += r.steps
        all_tokens += r.tokens
        if r.finish_reason is not None and prompt_cache is not None:  # joins the conversation
            reply = r.tokens + ([r.stop_token] if r.stop_token is not None else [])
            if reply:
                model.encode(mx.array([reply], dtype=mx.int32), cache, step=prefill_step_size)
        text = ""
        if tokenizer is not None:
            full = tokenizer.decode(all_tokens)
            text, text_so_far = full[len(text_so_far) :], full
        elapsed = max(time.perf_counter() - tic, 1e-9)
        yield GenerationResponse(
            text=text,
            tokens=r.tokens,
            canvas=r.canvas,
            steps=r.steps,
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=len(all_tokens),
            generation_tps=len(all_tokens) / elapsed,
            decoder_forwards=forwards,
            tokens_per_forward=len(all_tokens) / max(forwards, 1),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=r.finish_reason,
            stop_token=r.stop_token,
        )


def print_stats(r, file=None):
    """mlx-lm's closing figures for a `GenerationResponse` or a `BatchResponse`."""
    import sys

    out = file or sys.stdout
    print("=" * 10, file=out)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=out)
    print(
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=out
    )
    if isinstance(r, GenerationResponse):
        n = r.canvas + 1
        print(
            f"Denoising: {n} canvases, {r.decoder_forwards / n:.1f} steps per canvas, "
            f"{r.tokens_per_forward:.3f} tokens per forward",
            file=out,
        )
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=out)
