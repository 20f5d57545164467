"""Continuous batching at canvas granularity. One thread owns the model (MLX streams belong to
the thread that made them). Between canvases it admits queued requests (their prompts are
encoded, reusing the prompt store), drops rows whose client left, and runs the next canvas for
every row that shares its sampler settings; rows leave as soon as they finish.

Each row keeps its own one-row prompt cache and random key, drawn as `stream_generate` draws
them, and the decoder sees each row at its own positions (CanvasKV of several caches): with a
seed, a row's tokens are those of its request served alone. Rows whose settings differ (steps,
temperatures, ...) cannot share a denoising step; their groups take turns, a canvas each."""

import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx

from ..generation import Draft, cut_at_eos, denoise_canvas, eos_ids_for, init_canvas
from ..sampler import SamplerSettings
from .prompt_store import PromptStore


class QueueFull(Exception):
    pass


class Job:
    """One request as the scheduler sees it. The callbacks run on the scheduler thread:
    `on_start(cached_tokens)` once its prompt is encoded, `on_tokens(row, tokens, finish)` per
    row and canvas (returns True to end the row now: a stop string), `on_draft(row, Draft)` per
    denoising step when `drafts`, `on_done(row, finish)` per row, `on_error(message)` once."""

    def __init__(
        self,
        prompt: List[int],
        settings: SamplerSettings,
        n: int = 1,
        seed: Optional[int] = None,
        drafts: bool = False,
        run_alone: Optional[Callable] = None,
        images: Optional[list] = None,
    ):
        self.prompt, self.settings, self.n, self.seed = prompt, settings, n, seed
        self.drafts = drafts
        self.images = images or []  # image sources for a model that reads them (model.encode)
        self.run_alone = run_alone  # a job the batch cannot take (infilling): run(job) in turn
        self.cancelled = threading.Event()

    def on_start(self, cached_tokens: int): ...

    def on_tokens(self, row: int, tokens: List[int], finish: Optional[str]) -> bool:
        return False

    def on_draft(self, row: int, draft: Draft): ...

    def on_done(self, row: int, finish: str): ...

    def on_error(self, message: str): ...


@dataclass
class _Row:
    job: Job
    index: int  # choice index within its job
    cache: object  # this row's one-row PromptCache
    key: mx.array
    tokens: List[int]
    canvas: int = 0
    done: bool = False


def _group_key(settings: SamplerSettings) -> tuple:
    return tuple(getattr(settings, f.name) for f in fields(settings) if f.name != "max_tokens")


def row_key(seed: Optional[int], index: int) -> mx.array:
    """Choice `index` of a request with `seed` draws as a request with seed + index would."""
    if seed is None:
        return mx.random.key(secrets.randbits(63))
    return mx.random.key((seed + index) % 2**63)


class Scheduler:
    def __init__(
        self,
        model,
        tokenizer,
        store: Optional[PromptStore] = None,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_step_size: int = 2048,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.store = store if store is not None else PromptStore(0)
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self.eos = eos_ids_for(model, tokenizer)
        self.queue: "queue.Queue[Job]" = queue.Queue(maxsize=max_queue)
        self.groups: dict = {}  # settings key -> rows
        self.turns: deque = deque()  # group keys, in turn order
        self.waiting: Optional[Job] = None  # admitted next, once its rows fit
        self.stats = {
            "canvases": 0,
            "canvas_rows": 0,
            "prompt_tokens": 0,
            "prompt_tokens_encoded": 0,
            "prompt_tokens_cached": 0,
        }
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True, name="scheduler")
        self.thread.start()

    # ---- other threads ---------------------------------------------------------------------
    def submit(self, job: Job):
        """Queues a job; QueueFull when the queue is at its bound."""
        if job.n > self.max_batch:
            raise ValueError(f"'n' must be at most {self.max_batch} (the batch size)")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def stop(self):
        self.running = False
        self.thread.join(timeout=30)
        # join() returns before the OS thread has run its C++ thread-local destructors: MLX's
        # per-thread compile cache takes the GIL to free what it holds, and once the interpreter
        # is finalizing that aborts the process ("terminate called without an active
        # exception"). On Linux, wait until the thread is gone.
        task = Path(f"/proc/self/task/{self.thread.native_id}")
        deadline = time.monotonic() + 10
        while task.exists() and time.monotonic() < deadline:
            time.sleep(0.005)

    @property
    def active_rows(self) -> int:
        return sum(len(rows) for rows in self.groups.values())

    @property
    def queued(self) -> int:
        return self.queue.qsize() + (self.waiting is not None)

    # ---- the scheduler thread ---------------------------------------------------------------
    def _loop(self):
        # The thread runs on the default stream: a stream made here would be torn down with the
        # process while its worker still runs (the interpreter aborts at exit).
        while self.running:
            self._admit(block=not self.groups)
            if not self.turns:
                continue
            key = self.turns[0]
            self.turns.rotate(-1)
            rows = [r for r in self.groups[key] if not r.job.cancelled.is_set()]
            if rows:
                try:
                    self._canvas(rows)
                except Exception as e:  # this group's requests fail; the server goes on
                    for job in {id(r.job): r.job for r in rows}.values():
                        job.on_error(f"internal error: {type(e).__name__}: {e}")
                    rows = []
            rows = [r for r in rows if not r.done and not r.job.cancelled.is_set()]
            if rows:
                self.groups[key] = rows
            else:
                del self.groups[key]
                self.turns.remove(key)

    def _admit(self, block: bool):
        while self.running:
            job = self.waiting
            if job is None:
                try:
                    job = self.queue.get(timeout=0.2) if block else self.queue.get_nowait()
                except queue.Empty:
                    return
            self.waiting = None
            if job.cancelled.is_set():
                continue
            if job.run_alone is not None:
                self._guard(job, lambda: job.run_alone(job))
                continue
            if self.active_rows + job.n > self.max_batch:
                self.waiting = job  # joins at a later canvas boundary
                return
            self._guard(job, lambda: self._start(job))
            block = False

    def _guard(self, job, fn):
        try:
            fn()
        except Exception as e:
            job.on_error(f"internal error: {type(e).__name__}: {e}")

    def _start(self, job: Job):
        """Encodes the prompt (after its longest kept prefix) and adds the job's rows."""
        # Equal tokens with other images are another prompt: such prompts are not kept.
        store = self.store if not job.images else PromptStore(0)
        cache, cached = store.fetch(job.prompt)
        if cache is None:
            cache = self.model.make_cache()
        new = job.prompt[cached:]
        if new:
            vision = None
            if job.images:  # the prompt holds the image blocks; the tower gives their features
                from ..multimodal import vision_prompt

                vision = vision_prompt(self.model, None, job.prompt, job.images).vision
            self.model.encode(
                mx.array([new], dtype=mx.int32), cache, step=self.prefill_step_size, vision=vision
            )
        store.insert(job.prompt, cache)
        self.stats["prompt_tokens"] += len(job.prompt)
        self.stats["prompt_tokens_encoded"] += len(new)
        self.stats["prompt_tokens_cached"] += cached
        job.on_start(cached)
        key = _group_key(job.settings)
        if key not in self.groups:
            self.groups[key] = []
            self.turns.append(key)
        self.groups[key] += [
            _Row(job, i, cache.copy(), row_key(job.seed, i), []) for i in range(job.n)
        ]

    def _canvas(self, rows: List[_Row]):
        """One canvas for rows sharing their settings: denoise, hand out, commit."""
        model, settings = self.model, rows[0].job.settings
        C, V = model.args.canvas_length, model.args.vocab_size
        starts, run_keys = [], []
        for r in rows:  # as block_generate splits a single request's key
            r.key, k_init, k_run = mx.random.split(r.key, 3)
            starts.append(init_canvas(k_init, 1, C, V))
            run_keys.append(k_run)

        def on_step(steps, argmax, accepted, entropy, alive):
            for pos, j in enumerate(alive):
                r = rows[j]
                if r.job.drafts and not r.job.cancelled.is_set():
                    r.job.on_draft(
                        r.index,
                        Draft(
                            r.canvas,
                            steps,
                            argmax[pos].tolist(),
                            accepted[pos].tolist(),
                            entropy[pos].mean().item(),
                        ),
                    )
            return {j for j in alive if rows[j].job.cancelled.is_set()}

        committed, _ = denoise_canvas(
            model, [r.cache for r in rows], mx.concatenate(starts), settings, run_keys, on_step
        )
        self.stats["canvases"] += 1
        self.stats["canvas_rows"] += len(rows)
        for r, toks in zip(rows, committed.tolist()):
            if r.job.cancelled.is_set():
                continue
            r.canvas += 1
            limit = r.job.settings.max_tokens - len(r.tokens)
            tokens, hit = cut_at_eos(toks, self.eos, limit)
            r.tokens += tokens
            finish = (
                "stop"
                if hit is not None
                else ("length" if len(r.tokens) >= r.job.settings.max_tokens else None)
            )
            cut = r.job.on_tokens(r.index, tokens, finish)
            if cut:  # a stop string: what the client saw is cut short
                finish = "stop"
            if finish is None:
                model.encode(mx.array([toks], dtype=mx.int32), r.cache, step=self.prefill_step_size)
                continue
            r.done = True
            r.job.on_done(r.index, finish)
            if self.store.max_entries > 0 and not cut and not r.job.images:  # kept for turn 2
                reply = tokens + ([] if hit is None else [hit])
                if reply:
                    model.encode(
                        mx.array([reply], dtype=mx.int32), r.cache, step=self.prefill_step_size
                    )
                self.store.insert(r.job.prompt + r.tokens + reply[len(tokens) :], r.cache)
