"""Several prompts at once: `batch_generate`."""

import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import mlx.core as mx

from .generation import (
    block_generate,
    check_context,
    check_ids,
    eos_ids_for,
    prompt_ids,
    resolve_settings,
)
from .model import Model
from .sampler import SamplerSettings, random_key


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


def batch_generate(
    model: Model,
    tokenizer,
    prompts: Sequence[Union[str, Sequence[int]]],
    max_tokens: Optional[int] = None,
    max_denoising_steps: Optional[int] = None,
    entropy_bound: Optional[float] = None,
    t_min: Optional[float] = None,
    t_max: Optional[float] = None,
    stability_threshold: Optional[int] = None,
    confidence_threshold: Optional[float] = None,
    seed: Optional[int] = None,
    initial_canvases=None,
    eos_token_ids=None,
    system_prompt: Optional[str] = None,
    enable_thinking: bool = False,
    apply_chat_template: bool = True,
    prefill_step_size: int = 2048,
    verbose: bool = False,
    images: Optional[Sequence[Sequence]] = None,
    image_soft_tokens: Optional[int] = None,
    settings: Optional[SamplerSettings] = None,
) -> BatchResponse:
    """Generates for prompts of different lengths together. Prompts are left-padded and the
    padding is masked in the prompt pass, in every canvas-commit pass and in the decoder, so
    each row matches a run of its prompt alone. Rows stop denoising on their own (their state
    freezes) and leave the batch once they hit EOS. `images` holds one list per prompt."""
    if not prompts:
        raise ValueError("no prompts given")
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
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"images: one list per prompt ({len(prompts)}), got {len(images)}")
    rows, vision = [], {}
    for i, p in enumerate(prompts):
        ids, feats = prompt_ids(
            model,
            tokenizer,
            p,
            images[i] if images else None,
            None,
            system_prompt,
            enable_thinking,
            apply_chat_template,
            image_soft_tokens,
        )
        rows.append(ids)
        for token, f in (feats or {}).items():  # row-major: the order the encoder reads them
            vision[token] = f if token not in vision else mx.concatenate([vision[token], f])
    for r in rows:
        check_ids(model, r)
    longest = max(len(r) for r in rows)
    check_context(model, longest, 0, settings)
    pad = model.args.pad_token_id or 0
    ids = mx.array([[pad] * (longest - len(r)) + r for r in rows], dtype=mx.int32)
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
        vision=vision or None,
    )
    prompt_tps = sum(len(r) for r in rows) / max(time.perf_counter() - tic, 1e-9)

    tic = time.perf_counter()
    out: List[List[int]] = [[] for _ in rows]
    finish = ["length"] * len(rows)
    forwards = 0
    for _, steps, per_row in block_generate(
        model, cache, len(rows), settings, key, eos, first, prefill_step_size=prefill_step_size
    ):
        forwards += steps
        for r, (toks, hit) in per_row.items():
            out[r] += toks
            if hit is not None:
                finish[r] = "stop"
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
        print(f"Prompt: {res.prompt_tokens} tokens, {res.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {n} tokens, {res.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {res.peak_memory:.3f} GB")
    return res
