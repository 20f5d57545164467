"""Block-diffusion generation with the reference sampler: the denoising loop and
`stream_generate`."""

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .backends import selected
from .cache import CanvasKV
from .model import Model
from .sampler import (
    SamplerSettings,
    denoise_sample,
    random_key,
    split_keys,
    stop_update,
    temperature,
)
from .step import CompiledStep
from .step import enabled as compiling


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


@dataclass
class Draft:
    """One denoising step of a canvas, for live views (see `draft_callback`)."""

    canvas: int
    step: int
    tokens: List[int]  # argmax canvas of this step (row 0)
    accepted: List[bool]  # positions the sampler kept (the rest were re-noised)
    mean_entropy: float


@dataclass
class Pins:
    """Canvas positions held fixed while the rest is denoised (infilling): a (B, C) mask and
    the tokens at those positions."""

    mask: mx.array
    tokens: mx.array

    def filter(self, keep: List[int]) -> "Pins":
        """The pins of the rows `keep`."""
        idx = mx.array(keep, dtype=mx.int32)
        return Pins(self.mask[idx], self.tokens[idx])


def init_canvas(key, batch: int, length: int, vocab: int) -> mx.array:
    """Uniform-random tokens, as the reference's `initialize_canvas`."""
    return mx.random.randint(0, vocab, (batch, length), dtype=mx.int32, key=key)


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
    if eos_token_ids is None:
        eos_token_ids = model.generation_config.get("eos_token_id", model.args.eos_token_id)
        if eos_token_ids is None and tokenizer is not None:
            eos_token_ids = list(getattr(tokenizer, "eos_token_ids", []) or [])
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    return sorted(set(int(e) for e in (eos_token_ids or [])))


@dataclass
class _Step:
    """One denoising step's (lazy) outputs, and the key the next step splits. The next step's
    self-conditioning signal comes from `probs`, or is `soft` already (the compiled step)."""

    canvas: mx.array
    argmax: mx.array
    entropy: mx.array
    accepted: mx.array
    probs: Optional[mx.array]
    finished: mx.array
    history: Optional[mx.array]
    key: Union[mx.array, List[mx.array]]
    soft: Optional[mx.array] = None

    def filter(self, keep: List[int]) -> "_Step":
        """The rows `keep` of this step: what the next step reads of them."""
        idx = mx.array(keep, dtype=mx.int32)
        history = None if self.history is None else self.history[:, idx]
        key = [self.key[j] for j in keep] if isinstance(self.key, list) else self.key
        return _Step(
            self.canvas[idx],
            self.argmax[idx],
            self.entropy[idx],
            self.accepted[idx],
            None if self.probs is None else self.probs[idx],
            self.finished[idx],
            history,
            key,
            None if self.soft is None else self.soft[idx],
        )


class CanvasSteps:
    """How `denoise_canvas` builds the steps of one canvas against `cache`: its K/V buffers
    (`kv`), and each step's graph, built op by op or, where the backend compiles steps (step.py:
    Metal and CUDA, unless switched off), replayed from one traced graph whose shapes the padded
    buffers hold still. The benchmarks time these same calls."""

    def __init__(self, model: Model, cache, canvas_len: int, settings: SamplerSettings):
        self.model, self.settings = model, settings
        backend = selected()
        first = cache[0] if isinstance(cache, list) else cache
        compiled = compiling(backend) and all(k is not None for k in first.keys)
        self.kv = CanvasKV(cache, canvas_len, padded=compiled)
        self.compiled = CompiledStep(model, self.kv, settings, backend) if compiled else None
        self.bound = mx.array(settings.entropy_bound, dtype=mx.float32)

    def build_step(self, canvas, soft, history, key, remaining, pins=None) -> _Step:
        """The step with `remaining` steps to go (the first: `soft` None, no signal yet)."""
        model, settings = self.model, self.settings
        temp = mx.array(temperature(remaining, settings), dtype=mx.float32)
        pin_mask, pin_tokens = (None, None) if pins is None else (pins.mask, pins.tokens)
        if self.compiled is not None:  # it splits the key itself
            canvas, argmax, entropy, accepted, finished, history, soft, key = self.compiled(
                canvas, soft, history, key, temp, pin_mask, pin_tokens
            )
            return _Step(canvas, argmax, entropy, accepted, None, finished, history, key, soft)
        key, sub = split_keys(key)
        logits = model.decode(canvas, self.kv, soft_embeds=soft, softcap=False)
        canvas, argmax, entropy, accepted, probs = denoise_sample(
            logits,
            temp,
            self.bound,
            sub,
            pin_mask,
            pin_tokens,
            model.embed_dtype,
            softcap=model.args.final_logit_softcapping,
        )
        finished, history = stop_update(history, argmax, entropy, settings.confidence_threshold)
        return _Step(canvas, argmax, entropy, accepted, probs, finished, history, key)

    def build_next_step(self, step: _Step, remaining: int, pins=None) -> _Step:
        """The step after `step`, self-conditioned on its probabilities."""
        soft = step.soft
        if soft is None:
            soft = self.model.soft_embeddings_from_probs(step.probs)  # self-conditioning
        return self.build_step(step.canvas, soft, step.history, step.key, remaining, pins)


def denoise_canvas(
    model: Model,
    cache,
    canvas: mx.array,
    settings: SamplerSettings,
    key,
    on_step: Optional[Callable] = None,
    pins: Optional[Pins] = None,
):
    """Runs the sampler on one canvas (B, C) against `cache`; returns (committed argmax canvas,
    steps taken). `key` is one key for the batch, or a list of one key per row: then each row
    draws its own noise, as it would alone (a server's rows equal their runs served alone).
    `on_step(steps, argmax, accepted, entropy, rows)` sees each step of the rows still going
    (`rows`: their indices in the batch) and may return indices of rows to stop now (clients
    that left); their result is whatever their canvas holds.

    Per step: decoder forward and one compiled sampler graph, then one host sync for the
    stable-and-confident stop test. The sampler's probabilities become the next step's
    self-conditioning signal (hidden-sized) only when a next step follows. A row that stops early
    keeps its result and leaves the batch (the reference freezes it and keeps computing it).

    Where the backend says so (`prebuild_steps`: Metal and CUDA) the next step's graph is built
    before waiting for this one (building a 30-layer graph in Python takes milliseconds, as long
    as a whole step there) and handed to the device once this step says it does not stop:
    nothing is computed that is not used. On the CPU the forward itself syncs (expert tiles), so
    it is built after the test.

    Where the backend compiles steps (step.py: Metal and CUDA, unless switched off) a step is
    one traced graph replayed, its self-conditioning embedding computed inside it; the prefix
    and the rows are padded to buckets so that the graph's shapes stay put."""
    B, C = canvas.shape
    S, N = settings.stability_threshold, settings.max_denoising_steps
    if pins is not None:
        pins = Pins(pins.mask, pins.tokens.astype(mx.int32))
        canvas = mx.where(pins.mask, pins.tokens, canvas)
    history = mx.full((S, B, C), -1, dtype=mx.int32) if S else None
    alive = list(range(B))  # original rows still denoising
    final = [None] * B
    builder = CanvasSteps(model, cache, C, settings)
    cache = builder.kv  # the prefix K/V, copied once for all steps of this canvas
    prebuild = selected().prebuild_steps

    def build_step(canvas, soft, history, key, remaining):
        return builder.build_step(canvas, soft, history, key, remaining, pins)

    def build_next_step(step, remaining):
        return builder.build_next_step(step, remaining, pins)

    step, steps = build_step(canvas, None, history, key, N), 0
    for remaining in range(N, 0, -1):
        nxt = saved = None
        if prebuild and remaining > 1:
            saved = cache.snapshot()
            nxt = build_next_step(step, remaining - 1)
        mx.eval(
            step.canvas,
            step.argmax,
            step.finished,
            *(() if step.history is None else (step.history,)),
        )
        steps += 1
        stopped = step.finished.tolist()
        if on_step is not None:  # first: what it reads would otherwise queue behind the next step
            drop = on_step(steps, step.argmax, step.accepted, step.entropy, list(alive))
            if drop:
                stopped = [f or alive[j] in drop for j, f in enumerate(stopped)]
        if nxt is not None and not any(stopped):
            saved = None  # not restored: the next step may write its K/V buffers in place
            mx.async_eval(nxt.canvas, nxt.argmax, nxt.finished)  # the device starts on it now
        if all(stopped) or remaining == 1:
            break
        if any(stopped):  # finished rows leave: they cost no more work
            keep = [j for j, f in enumerate(stopped) if not f]
            for j, f in enumerate(stopped):
                if f:
                    final[alive[j]] = step.argmax[j]
            if saved is not None:  # the prebuilt step is dropped: so are its K/V writes
                cache.restore(saved)
            step = step.filter(keep)
            cache.filter(keep)
            pins = None if pins is None else pins.filter(keep)
            alive = [alive[j] for j in keep]
            nxt = None  # it was built for every row: rebuilt for those left
        step = nxt if nxt is not None else build_next_step(step, remaining - 1)
    for j, r in enumerate(alive):
        final[r] = step.argmax[j]
    return mx.stack(final), steps


def cut_at_eos(tokens: List[int], eos, limit: Optional[int] = None) -> tuple:
    """(tokens before the first EOS and at most `limit` of them, that EOS id or None). An EOS
    past the limit is not reached: the response ends for length."""
    hit = next((i for i, t in enumerate(tokens) if t in eos), None)
    if limit is not None and (hit is None or hit > limit):
        return tokens[:limit], None
    return (tokens, None) if hit is None else (tokens[:hit], tokens[hit])


def block_generate(
    model: Model,
    cache,
    rows: int,
    settings: SamplerSettings,
    key,
    eos: Sequence[int],
    first_canvas: Optional[mx.array] = None,
    pins: Optional[Pins] = None,
    on_step: Optional[Callable] = None,
    prefill_step_size: int = 2048,
):
    """The block-autoregressive loop over `rows` prompts already in `cache`. Yields, per canvas,
    (canvas index, steps, {row: (tokens cut at EOS, the EOS id or None)}) for the rows still
    going. A row that hits EOS leaves the batch (its cache rows are dropped) before the next
    canvas; the committed canvas of the others joins the cache. `first_canvas` / `pins` apply to
    the first canvas. The last canvas is denoised whole, but only `settings.max_tokens` tokens
    in all are yielded."""
    C, V = model.args.canvas_length, model.args.vocab_size
    n_canvases = -(-settings.max_tokens // C)
    active = list(range(rows))
    committed = None
    for c in range(n_canvases):
        if committed is not None:
            model.encode(committed, cache, step=prefill_step_size)
        key, k_init, k_run = mx.random.split(key, 3)
        canvas = (
            first_canvas
            if (c == 0 and first_canvas is not None)
            else init_canvas(k_init, len(active), C, V)
        )
        step_cb = None if on_step is None else (lambda *a, _c=c: on_step(_c, *a))
        committed, steps = denoise_canvas(
            model, cache, canvas, settings, k_run, step_cb, pins if c == 0 else None
        )
        out, keep = {}, []
        limit = settings.max_tokens - c * C
        for j, toks in enumerate(committed.tolist()):
            toks, hit = cut_at_eos(toks, eos, limit)
            out[active[j]] = (toks, hit)
            if hit is None:
                keep.append(j)
        yield c, steps, out
        if not keep or c == n_canvases - 1:
            return
        if len(keep) < len(active):
            cache.filter(keep)
            committed = committed[mx.array(keep, dtype=mx.int32)]
            active = [active[j] for j in keep]


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
        cache_len + n_prompt + -(-settings.max_tokens // args.canvas_length) * args.canvas_length
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


def stream_generate(
    model: Model,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    max_tokens: Optional[int] = None,
    max_denoising_steps: Optional[int] = None,
    entropy_bound: Optional[float] = None,
    t_min: Optional[float] = None,
    t_max: Optional[float] = None,
    stability_threshold: Optional[int] = None,
    confidence_threshold: Optional[float] = None,
    seed: Optional[int] = None,
    initial_canvas=None,
    eos_token_ids=None,
    draft_callback: Optional[Callable[[Draft], None]] = None,
    system_prompt: Optional[str] = None,
    enable_thinking: bool = False,
    apply_chat_template: bool = True,
    prompt_cache=None,
    pins: Optional[Pins] = None,
    prefill_step_size: int = 2048,
    images: Optional[Sequence] = None,
    videos: Optional[Sequence] = None,
    image_soft_tokens: Optional[int] = None,
    settings: Optional[SamplerSettings] = None,
) -> Iterator[GenerationResponse]:
    """Yields one `GenerationResponse` per committed canvas.

    The sampler's settings: the keywords, else `settings` (one `SamplerSettings` a caller
    resolves once and passes on), else the checkpoint's generation_config.json, else the
    reference's globals.
    `initial_canvas` gives the first canvas's starting tokens (the reference's
    `decoder_input_ids`); `draft_callback(Draft)` sees every denoising step. With a
    `prompt_cache` (from `make_prompt_cache`), `prompt` holds only the new tokens: they are
    encoded after what the cache holds, and when generation ends the response (up to and with
    its EOS) is encoded too, so the cache holds the whole conversation for the next turn.
    `images` (paths, URLs, data URLs, PIL images, arrays) go where the chat template puts
    them (token-id prompts: after the BOS, unless the ids already hold their blocks), each with
    at most `image_soft_tokens` soft tokens (default: the checkpoint's); `videos` (paths) as
    Gemma 4 lays out video frames."""
    settings = resolve_settings(
        model,
        settings,
        max_tokens=max_tokens,
        max_denoising_steps=max_denoising_steps,
        entropy_bound=entropy_bound,
        t_min=t_min,
        t_max=t_max,
        stability_threshold=stability_threshold,
        confidence_threshold=confidence_threshold,
    )
    ids, vision = prompt_ids(
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

    on_step = None
    if draft_callback is not None:

        def on_step(c, step, argmax, accepted, entropy, rows):
            draft_callback(
                Draft(c, step, argmax[0].tolist(), accepted[0].tolist(), entropy[0].mean().item())
            )

    tic = time.perf_counter()
    all_tokens: List[int] = []
    forwards, text_so_far = 0, ""
    n_canvases = -(-settings.max_tokens // C)
    for c, steps, rows in block_generate(
        model, cache, 1, settings, key, eos, first, pins, on_step, prefill_step_size
    ):
        forwards += steps
        tokens, hit = rows[0]
        all_tokens += tokens
        finish = "stop" if hit is not None else ("length" if c == n_canvases - 1 else None)
        if finish is not None and prompt_cache is not None:  # the reply joins the conversation
            reply = tokens + ([hit] if hit is not None else [])
            if reply:
                model.encode(mx.array([reply], dtype=mx.int32), cache, step=prefill_step_size)
        text = ""
        if tokenizer is not None:
            full = tokenizer.decode(all_tokens)
            text, text_so_far = full[len(text_so_far) :], full
        elapsed = max(time.perf_counter() - tic, 1e-9)
        yield GenerationResponse(
            text=text,
            tokens=tokens,
            canvas=c,
            steps=steps,
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=len(all_tokens),
            generation_tps=len(all_tokens) / elapsed,
            decoder_forwards=forwards,
            tokens_per_forward=len(all_tokens) / max(forwards, 1),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            stop_token=hit,
        )


def print_stats(r: GenerationResponse, file=None):
    import sys

    out = file or sys.stdout
    print("=" * 10, file=out)
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=out)
    print(
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=out
    )
    n = r.canvas + 1
    print(
        f"Denoising: {n} canvases, {r.decoder_forwards / n:.1f} steps per canvas, "
        f"{r.tokens_per_forward:.3f} tokens per forward",
        file=out,
    )
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=out)
