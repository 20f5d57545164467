"""Several prompts at once: `batch_generate`."""

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import mlx.core as mx

from .generation import (
    check_context,
    check_ids,
    eos_ids_for,
    print_stats,
    prompt_ids,
    split_keywords,
)
from .generator import CanvasGenerator
from .model import Model
from .sampler import SamplerSettings, random_key

# `stream_generate`'s prompt keywords but `videos` and `images` (one list per prompt here).
BATCH_PROMPT_KEYWORDS = (
    "system_prompt",
    "enable_thinking",
    "apply_chat_template",
    "image_soft_tokens",
)


@dataclass
class BatchResponse:
    texts: List[str]
    tokens: List[List[int]]  # per prompt, cut before the first EOS
    finish_reasons: List[str]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    decoder_forwards: int
    peak_memory: float  # GB


def batch_prompt_ids(model: Model, tokenizer, prompts, images, prompt_kw: dict):
    """Each prompt's ids, and the features of every vision token of the batch (row-major: the
    order the encoder reads them), or None."""
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"images: one list per prompt ({len(prompts)}), got {len(images)}")
    rows, vision = [], {}
    for i, p in enumerate(prompts):
        ids, feats = prompt_ids(model, tokenizer, p, images[i] if images else None, **prompt_kw)
        check_ids(model, ids)
        rows.append(ids)
        for token, f in (feats or {}).items():
            vision[token] = f if token not in vision else mx.concatenate([vision[token], f])
    return rows, vision or None


def batch_generate(
    model: Model,
    tokenizer,
    prompts: Sequence[Union[str, Sequence[int]]],
    max_tokens: Optional[int] = None,
    *,
    settings: Optional[SamplerSettings] = None,
    seed: Optional[int] = None,
    initial_canvases=None,
    eos_token_ids=None,
    prefill_step_size: int = 2048,
    verbose: bool = False,
    images: Optional[Sequence[Sequence]] = None,
    **kwargs,
) -> BatchResponse:
    """Generates for prompts of different lengths together. Prompts are left-padded and the
    padding is masked in the prompt pass, in every canvas-commit pass and in the decoder, so
    each row matches a run of its prompt alone. Rows stop denoising on their own (their state
    freezes) and leave the batch once they hit EOS. `images` holds one list per prompt; the
    other keywords are `stream_generate`'s (sampler settings, `system_prompt`,
    `enable_thinking`, `apply_chat_template`, `image_soft_tokens`)."""
    if not prompts:
        raise ValueError("no prompts given")
    kwargs["max_tokens"] = max_tokens
    settings, prompt_kw = split_keywords(model, settings, kwargs, BATCH_PROMPT_KEYWORDS)
    rows, vision = batch_prompt_ids(model, tokenizer, prompts, images, prompt_kw)
    longest = max(len(r) for r in rows)
    check_context(model, longest, 0, settings)
    pad = model.args.pad_token_id or 0
    ids = mx.array([[pad] * (longest - len(r)) + r for r in rows], dtype=mx.int32)  # (B, L)
    mask = mx.array([[False] * (longest - len(r)) + [True] * len(r) for r in rows])
    eos = eos_ids_for(model, tokenizer, eos_token_ids)
    key = random_key(seed)
    first = None
    if initial_canvases is not None:
        first = mx.array(initial_canvases, dtype=mx.int32)
        if first.shape != (len(rows), model.args.canvas_length):
            raise ValueError(
                f"initial_canvases must have shape ({len(rows)}, {model.args.canvas_length})"
            )

    mx.reset_peak_memory()
    tic = time.perf_counter()
    cache = model.make_cache()
    model.encode(
        ids,
        cache,
        step=prefill_step_size,
        mask=None if all(mask.all(axis=1).tolist()) else mask,
        vision=vision,
    )
    prompt_tps = sum(len(r) for r in rows) / max(time.perf_counter() - tic, 1e-9)

    generator = CanvasGenerator(model, eos, prefill_step_size)
    uids = generator.insert(cache, settings, key, rows=len(rows), first_canvas=first)
    row_of = {u: i for i, u in enumerate(uids)}
    tic = time.perf_counter()
    out: List[List[int]] = [[] for _ in rows]
    finish = ["length"] * len(rows)
    forwards = 0
    while len(generator):
        responses = generator.next()
        forwards += responses[0].steps
        for r in responses:
            out[row_of[r.uid]] += r.tokens
            if r.finish_reason == "stop":
                finish[row_of[r.uid]] = "stop"
    n = sum(len(t) for t in out)
    texts = [tokenizer.decode(t) if tokenizer is not None else "" for t in out]
    res = BatchResponse(
        texts,
        out,
        finish,
        sum(len(r) for r in rows),
        prompt_tps,
        n,
        n / max(time.perf_counter() - tic, 1e-9),
        forwards,
        mx.get_peak_memory() / 1e9,
    )
    if verbose:
        for i, t in enumerate(texts):
            print(f"--- {i}: {t}")
        print_stats(res)
    return res
