"""The one canvas generator every caller drives (`stream_generate`, `batch_generate`, `infill`,
chat and the server's scheduler), as mlx-lm's `BatchGenerator` is for its callers.

Rows arrive in cohorts (`insert`): the rows of one prompt cache that share one random key.
`batch_generate` inserts one cohort of B rows (its noise is drawn for the whole batch, as the
reference draws it); `stream_generate` and each server choice insert one-row cohorts, and a
one-row cohort draws what it would alone, so one-row cohorts with the same settings denoise
together and each row's tokens are those of its request served alone. Rows whose settings
differ cannot share a denoising step: their groups take turns, a canvas each `next()`.

A canvas commits lazily: a row that goes on has its committed canvas encoded into its cache
just before its next canvas, so a row that finishes (or that the caller removes) costs no
encoder pass."""

import itertools
from dataclasses import dataclass, fields
from typing import Callable, Dict, List, Optional

import mlx.core as mx

from .cache import PromptCache
from .denoise import Draft, Pins, denoise_canvas
from .model import Model
from .sampler import SamplerSettings


@dataclass
class CanvasResponse:
    """One row's share of one canvas."""

    uid: int
    canvas: int  # index of this canvas in the row's generation, from 0
    steps: int  # denoising steps it took
    tokens: List[int]  # its new tokens, cut before the first EOS and at the row's token limit
    committed: List[int]  # the whole canvas as denoised
    stop_token: Optional[int]  # the EOS id that ended the row
    finish_reason: Optional[str]  # "stop" (EOS), "length", or None while the row goes on


def init_canvas(key, batch: int, length: int, vocab: int) -> mx.array:
    """Uniform-random tokens, as the reference's `initialize_canvas`."""
    return mx.random.randint(0, vocab, (batch, length), dtype=mx.int32, key=key)


def cut_at_eos(tokens: List[int], eos, limit: Optional[int] = None) -> tuple:
    """(tokens before the first EOS and at most `limit` of them, that EOS id or None). An EOS
    past the limit is not reached: the response ends for length."""
    hit = next((i for i, t in enumerate(tokens) if t in eos), None)
    if limit is not None and (hit is None or hit > limit):
        return tokens[:limit], None
    return (tokens, None) if hit is None else (tokens[:hit], tokens[hit])


def settings_group(settings: SamplerSettings) -> tuple:
    """Rows with equal settings (the token limit aside) can share a denoising step."""
    return tuple(getattr(settings, f.name) for f in fields(settings) if f.name != "max_tokens")


@dataclass
class _Cohort:
    """Rows of one prompt cache that share one key. Per-row lists follow `uids`."""

    uids: List[int]
    cache: PromptCache
    key: mx.array
    settings: SamplerSettings
    first: Optional[mx.array]  # (rows, C) starting tokens of the first canvas
    pins: Optional[Pins]  # held positions of the first canvas
    on_draft: List[Optional[Callable]]
    cancelled: List[Optional[Callable]]
    made: List[int]  # tokens returned so far, per row
    canvas: int = 0  # canvases done
    pending: Optional[mx.array] = None  # committed canvas still to encode into the cache

    def group(self):
        return ("rows", settings_group(self.settings)) if len(self.uids) == 1 else ("own", id(self))

    def filter(self, keep: List[int]):
        """Keeps the rows at positions `keep` (the cache and the pending canvas with them)."""
        if len(keep) == len(self.uids):
            return
        if not keep:  # the cohort is done: its cache stays as the caller last saw it
            self.uids, self.pending = [], None
            return
        idx = mx.array(keep, dtype=mx.int32)
        self.cache.filter(keep)
        if self.pending is not None:
            self.pending = self.pending[idx]
        if self.first is not None:
            self.first = self.first[idx]
        if self.pins is not None:
            self.pins = self.pins.filter(keep)
        for name in ("uids", "on_draft", "cancelled", "made"):
            setattr(self, name, [getattr(self, name)[j] for j in keep])


class CanvasGenerator:
    """Rows, each with its own prompt cache, key, settings, pins and token limit; `next()`
    denoises one canvas of the next group of rows and returns one `CanvasResponse` per row.
    Finished rows leave by themselves; `remove(uids)` takes rows out early (a stop string, a
    client that left). Each denoising step is seen through a row's `on_draft(Draft)`, and a
    row whose `cancelled()` turns true stops at the next step and returns nothing more.

    `step_sync(flags) -> flags`, where given, runs at every denoising step with the rows that
    `cancelled()` stops there and returns the rows that stop: the server's other ranks take
    rank 0's word for it, so every rank denoises the same rows."""

    def __init__(self, model: Model, eos, prefill_step_size: int = 2048, step_sync=None):
        self.model, self.eos = model, set(eos)
        self.prefill_step_size = prefill_step_size
        self.step_sync = step_sync
        self.groups: Dict[tuple, List[_Cohort]] = {}  # in turn order
        self._uids = itertools.count()
        self._stopped = set()  # uids stopped during the canvas being denoised

    @property
    def uids(self) -> List[int]:
        return [u for cohorts in self.groups.values() for co in cohorts for u in co.uids]

    def __len__(self) -> int:
        return sum(len(co.uids) for cohorts in self.groups.values() for co in cohorts)

    def insert(
        self,
        cache: PromptCache,
        settings: SamplerSettings,
        key: mx.array,
        rows: int = 1,
        first_canvas: Optional[mx.array] = None,
        pins: Optional[Pins] = None,
        on_draft=None,
        cancelled=None,
    ) -> List[int]:
        """Adds `rows` rows whose prompts `cache` holds, drawing from one `key`. `first_canvas`
        (rows, C) and `pins` apply to their first canvas; `on_draft` / `cancelled` are one
        callable (or None) per row. Returns the rows' uids."""
        uids = [next(self._uids) for _ in range(rows)]
        co = _Cohort(
            uids,
            cache,
            key,
            settings,
            first_canvas,
            pins,
            list(on_draft or [None] * rows),
            list(cancelled or [None] * rows),
            [0] * rows,
        )
        self.groups.setdefault(co.group(), []).append(co)
        return uids

    def remove(self, uids):
        """Takes these rows out; the rest of their cohort goes on."""
        gone = set(uids)
        for cohorts in self.groups.values():
            for co in cohorts:
                co.filter([j for j, u in enumerate(co.uids) if u not in gone])
        self._prune()

    def filter(self, keep):
        """Keeps only the rows `keep` (uids)."""
        keep = set(keep)
        self.remove([u for u in self.uids if u not in keep])

    def upcoming(self) -> List[int]:
        """The uids the next `next()` advances."""
        if not self.groups:
            return []
        return [u for co in next(iter(self.groups.values())) for u in co.uids]

    def next(self) -> List[CanvasResponse]:
        """One canvas for the next group in turn; the group then waits behind the others."""
        if not self.groups:
            return []
        name = next(iter(self.groups))
        cohorts = self.groups.pop(name)
        try:
            out = self._canvas(cohorts)
        finally:  # what is left of the group (all of it, after an error) takes its next turn
            cohorts = [co for co in cohorts if co.uids]
            if cohorts:
                self.groups[name] = cohorts
        return out

    def _prune(self):
        for name in list(self.groups):
            self.groups[name] = [co for co in self.groups[name] if co.uids]
            if not self.groups[name]:
                del self.groups[name]

    def _canvas(self, cohorts: List[_Cohort]) -> List[CanvasResponse]:
        """Commits what is pending, denoises, cuts each row's tokens, drops finished rows."""
        model = self.model
        C, V = model.args.canvas_length, model.args.vocab_size
        for co in cohorts:
            if co.pending is not None:
                model.encode(co.pending, co.cache, step=self.prefill_step_size)
                co.pending = None
        starts, keys = [], []
        for co in cohorts:
            co.key, k_init, k_run = mx.random.split(co.key, 3)
            first = co.first if co.canvas == 0 else None
            starts.append(first if first is not None else init_canvas(k_init, len(co.uids), C, V))
            keys.append(k_run)
        rows = [(co, j) for co in cohorts for j in range(len(co.uids))]
        self._stopped = set()
        canvas = starts[0] if len(starts) == 1 else mx.concatenate(starts)
        caches = cohorts[0].cache if len(cohorts) == 1 else [co.cache for co in cohorts]
        committed, steps = denoise_canvas(
            model,
            caches,
            canvas,
            cohorts[0].settings,
            keys[0] if len(keys) == 1 else keys,
            self._step_watcher(rows),
            self._pins(cohorts, C),
        )
        out = []
        for co, canvas_rows in zip(cohorts, _split(committed, [len(co.uids) for co in cohorts])):
            out += self._commit(co, canvas_rows, steps)
        return out

    def _commit(self, co: _Cohort, committed: mx.array, steps: int) -> List[CanvasResponse]:
        out, keep = [], []
        for j, toks in enumerate(committed.tolist()):
            if co.uids[j] in self._stopped:
                continue
            tokens, hit = cut_at_eos(toks, self.eos, co.settings.max_tokens - co.made[j])
            co.made[j] += len(tokens)
            finish = "stop" if hit is not None else None
            if finish is None and co.made[j] >= co.settings.max_tokens:
                finish = "length"
            out.append(CanvasResponse(co.uids[j], co.canvas, steps, tokens, toks, hit, finish))
            if finish is None:
                keep.append(j)
        co.canvas += 1
        co.first = co.pins = None
        co.pending = committed
        co.filter(keep)
        return out

    @staticmethod
    def _pins(cohorts: List[_Cohort], C: int) -> Optional[Pins]:
        """The held positions of the rows on their first canvas (None: no row holds any)."""
        live = [co.pins if co.canvas == 0 else None for co in cohorts]
        if all(p is None for p in live):
            return None
        if len(live) == 1:
            return live[0]
        masks, tokens = [], []
        for co, p in zip(cohorts, live):
            n = len(co.uids)
            masks.append(p.mask if p is not None else mx.zeros((n, C), dtype=mx.bool_))
            tokens.append(p.tokens if p is not None else mx.zeros((n, C), dtype=mx.int32))
        return Pins(mx.concatenate(masks), mx.concatenate(tokens))

    def _step_watcher(self, rows):
        """denoise_canvas's `on_step` for `rows` ((cohort, position) per batch row): the rows
        whose caller has cancelled them stop, drafts go to the rows that want them."""
        quiet = all(co.on_draft[j] is None and co.cancelled[j] is None for co, j in rows)
        if quiet and self.step_sync is None:
            return None

        def cancelled(co, j):
            return co.cancelled[j] is not None and co.cancelled[j]()

        def on_step(steps, argmax, accepted, entropy, alive):
            stop = [cancelled(*rows[r]) for r in alive]
            if self.step_sync is not None:
                stop = self.step_sync(stop)
            drop = {r for s, r in zip(stop, alive) if s}
            self._stopped |= {rows[r][0].uids[rows[r][1]] for r in drop}
            for pos, r in enumerate(alive):
                co, j = rows[r]
                if r not in drop and co.on_draft[j] is not None:
                    draft = Draft(
                        co.canvas,
                        steps,
                        argmax[pos].tolist(),
                        accepted[pos].tolist(),
                        entropy[pos].mean().item(),
                    )
                    co.on_draft[j](draft)
            return drop

        return on_step


def _split(x: mx.array, sizes: List[int]) -> List[mx.array]:
    """`x` split along its first axis into parts of `sizes`."""
    if len(sizes) == 1:
        return [x]
    return mx.split(x, list(itertools.accumulate(sizes[:-1])))
