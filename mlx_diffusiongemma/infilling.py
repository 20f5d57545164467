"""Filling gaps in text: the prefix is encoded, the text after each gap is pinned in the canvas,
and the model denoises the gaps seeing both sides. Pinned tokens never change."""

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import mlx.core as mx

from .checks import check_int
from .denoise import Pins
from .generation import eos_ids_for, stream_generate
from .generator import cut_at_eos
from .model import Model

GAP_RE = re.compile(r"<\|gap(?::(\d+))?\|>")


@dataclass
class Gap:
    length: Optional[int] = None  # tokens; None shares the canvas's free room


@dataclass
class InfillResult:
    text: str  # the whole text with every gap filled
    fills: List[str]  # what went into each gap
    fill_tokens: List[List[int]]


def parse_gaps(text: str) -> List[Union[str, Gap]]:
    """'a <|gap|> b <|gap:12|> c' -> ['a ', Gap(), ' b ', Gap(12), ' c']."""
    parts: List[Union[str, Gap]] = []
    pos = 0
    for m in GAP_RE.finditer(text):
        parts.append(text[pos : m.start()])
        parts.append(Gap(int(m.group(1)) if m.group(1) else None))
        pos = m.end()
    parts.append(text[pos:])
    if not any(isinstance(p, Gap) for p in parts):
        raise ValueError("no gap marker (<|gap|> or <|gap:N|>) in the text")
    return parts


def layout(segments: Sequence[Union[str, Gap, Sequence[int]]], tokenizer, canvas_length: int):
    """Token ids of the prefix, and the canvas plan: a list of ('gap', n) / ('text', ids)."""

    def ids(seg, first=False):
        if isinstance(seg, str):
            if tokenizer is None:
                raise ValueError("text segments need a tokenizer")
            return list(tokenizer.encode(seg, add_special_tokens=first)) if seg else []
        return [int(t) for t in seg]

    for s in segments:
        if isinstance(s, Gap) and s.length is not None:
            check_int("gap length", s.length)
    prefix = ids(segments[0], first=True)
    if not prefix:
        raise ValueError("infilling needs some text before the first gap")
    plan = [("gap", s.length) if isinstance(s, Gap) else ("text", ids(s)) for s in segments[1:]]
    plan = [p for p in plan if not (p[0] == "text" and not p[1])]
    fixed = sum(len(v) for k, v in plan if k == "text") + sum(
        v for k, v in plan if k == "gap" and v
    )
    open_gaps = [i for i, (k, v) in enumerate(plan) if k == "gap" and v is None]
    room = canvas_length - fixed
    if room < len(open_gaps) or (not open_gaps and room < 0):
        raise ValueError(
            f"the gaps and the text after them need {fixed + len(open_gaps)} positions; "
            f"a canvas holds {canvas_length}"
        )
    for n, i in enumerate(open_gaps):  # share the free room, earlier gaps take the remainder
        plan[i] = ("gap", room // len(open_gaps) + (1 if n < room % len(open_gaps) else 0))
    if any(k == "gap" and v <= 0 for k, v in plan):
        raise ValueError("gap lengths must be positive")
    return prefix, plan


def canvas_pins(plan, canvas_length: int):
    """The canvas of a `layout` plan: its pins (the text after each gap held in place, one
    row) and each gap's (start, length)."""
    mask, tokens = [False] * canvas_length, [0] * canvas_length
    pos, gaps = 0, []
    for kind, v in plan:
        if kind == "gap":
            gaps.append((pos, v))
            pos += v
        else:
            mask[pos : pos + len(v)] = [True] * len(v)
            tokens[pos : pos + len(v)] = v
            pos += len(v)
    return Pins(mx.array([mask]), mx.array([tokens], dtype=mx.int32)), gaps


def infill(model: Model, tokenizer, text_or_segments, eos_token_ids=None, **kwargs) -> InfillResult:
    """Fills every gap of `text_or_segments`: a string with `<|gap|>` / `<|gap:N|>` markers, or
    a list alternating text (str or ids) and `Gap` objects. Keyword arguments go to
    `stream_generate` (seed, settings or the sampler keywords, draft_callback, images, ...),
    except `max_tokens`, which is one canvas unless given; images come before the text, after
    the BOS."""
    segments = (
        parse_gaps(text_or_segments)
        if isinstance(text_or_segments, str)
        else list(text_or_segments)
    )
    C = model.args.canvas_length
    prefix, plan = layout(segments, tokenizer, C)
    pins, gaps = canvas_pins(plan, C)
    if kwargs.get("max_tokens") is None:
        kwargs["max_tokens"] = C
    if kwargs["max_tokens"] > C:
        raise ValueError(f"infilling fills one canvas ({C} tokens)")
    canvas = None
    for r in stream_generate(
        model, tokenizer, prefix, apply_chat_template=False, eos_token_ids=[], pins=pins, **kwargs
    ):
        canvas = r.tokens
    eos = eos_ids_for(model, tokenizer, eos_token_ids)
    fill_tokens = [cut_at_eos(canvas[start : start + n], eos)[0] for start, n in gaps]
    dec = (lambda t: tokenizer.decode(t)) if tokenizer is not None else (lambda t: "")
    fills = [dec(t) for t in fill_tokens]
    text, g = "", 0
    for seg in segments:
        if isinstance(seg, Gap):
            text += fills[g]
            g += 1
        else:
            text += seg if isinstance(seg, str) else dec(list(seg))
    return InfillResult(text, fills, fill_tokens)
