"""Continuous batching at canvas granularity. One thread owns the model (MLX streams belong to
the thread that made them). Between canvases it admits queued requests (their prompts are
encoded, reusing the prompt store) and hands each choice to the canvas generator as a row of
its own (one-row prompt cache, its own key): with a seed, a row's tokens are those of its
request served alone. The generator runs the next canvas for every row that shares its sampler
settings (groups whose settings differ take turns), drops rows whose client left at the next
denoising step, and lets rows leave as soon as they finish.

On several ranks (a sharded model) only rank 0 has clients: each turn of its loop is a plan
(the jobs to start, the rows to drop) that every rank runs, and what its clients decide on the
way (a cancellation, a stop string) reaches the others before anything depends on it
(`ranks.RankLink`). The other ranks run `follow()` instead of a thread."""

import queue
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx

from ..denoise import Draft, Pins
from ..generation import eos_ids_for
from ..generator import CanvasGenerator, CanvasResponse, cut_at_eos
from ..sampler import SamplerSettings, random_key
from .prompt_store import PromptStore
from .ranks import follower_job, job_spec


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
        images: Optional[list] = None,
        pins: Optional[Pins] = None,
        gap: Optional[tuple] = None,
    ):
        self.prompt, self.settings, self.n, self.seed = prompt, settings, n, seed
        self.drafts = drafts
        self.images = images or []  # image sources for a model that reads them (model.encode)
        self.pins, self.gap = pins, gap  # infilling: the pinned canvas, the gap's (start, length)
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
    cache: object  # this row's one-row PromptCache (the generator encodes into it)
    tokens: List[int]
    ended: bool = False  # by its client: gone, or a stop string (it leaves at the next turn)


def row_key(seed: Optional[int], index: int) -> mx.array:
    """Choice `index` of a request with `seed` draws as a request with seed + index would."""
    return random_key(None if seed is None else (seed + index) % 2**63)


class Scheduler:
    def __init__(
        self,
        model,
        tokenizer,
        store: Optional[PromptStore] = None,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_step_size: int = 2048,
        link=None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.store = store if store is not None else PromptStore(0)
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self.link = link  # ranks.RankLink on several ranks
        self.queue: "queue.Queue[Job]" = queue.Queue(maxsize=max_queue)
        sync = None if link is None else link.agree
        eos = eos_ids_for(model, tokenizer)
        self.generator = CanvasGenerator(model, eos, prefill_step_size, step_sync=sync)
        self.rows: Dict[int, _Row] = {}  # by the generator's uid
        self.waiting: Optional[Job] = None  # admitted next, once its rows fit
        self.stats = {
            "canvases": 0,
            "canvas_rows": 0,
            "prompt_tokens": 0,
            "prompt_tokens_encoded": 0,
            "prompt_tokens_cached": 0,
        }
        self.running = True
        self.thread = None
        if link is None or link.leader:
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
        if self.thread is None:
            return
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
        return len(self.rows)

    @property
    def queued(self) -> int:
        return self.queue.qsize() + (self.waiting is not None)

    # ---- the scheduler thread (rank 0), and the other ranks ---------------------------------
    def _loop(self):
        try:
            self._lead()
        except Exception as e:  # on several ranks: another rank is gone, so is this server
            if self.link is None:
                raise
            from ..distributed import fail

            fail(f"rank 0: the other ranks cannot go on with this one ({type(e).__name__}: {e})")

    def _lead(self):
        # The thread runs on the default stream: a stream made here would be torn down with the
        # process while its worker still runs (the interpreter aborts at exit).
        while self.running:
            start = self._admit(block=not self.rows)
            drop = [u for u, r in self.rows.items() if r.ended or r.job.cancelled.is_set()]
            if self.link is not None:
                for job in start:  # the other ranks draw what rank 0 draws
                    job.seed = secrets.randbits(62) if job.seed is None else job.seed
                self.link.share({"start": [job_spec(j) for j in start], "drop": drop})
            self._turn(start, drop)
        if self.link is not None:
            self.link.share(None)  # the other ranks' `follow` returns

    def follow(self):
        """The loop of a rank other than 0: rank 0's turns, until it stops."""
        while True:
            plan = self.link.share()
            if plan is None:
                return
            self._turn([follower_job(s) for s in plan["start"]], plan["drop"])

    def _turn(self, start: List[Job], drop: List[int]):
        """Starts jobs, drops rows, runs a canvas and hands it out: the same on every rank."""
        for job in start:
            self._guard(job, lambda: self._start(job))
        self._drop(drop)
        if not self.rows:
            return
        uids = self.generator.upcoming()
        try:
            responses = self.generator.next()
        except Exception as e:  # this group's requests fail; the server goes on
            for job in {id(self.rows[u].job): self.rows[u].job for u in uids}.values():
                job.on_error(f"internal error: {type(e).__name__}: {e}")
            self._drop(uids)
            return
        self.stats["canvases"] += 1
        self.stats["canvas_rows"] += len(uids)
        ended = self._report(responses)
        if self.link is not None:
            ended = set(self.link.share({"ended": sorted(ended)})["ended"])
        for r in responses:
            self._settle(r, r.uid in ended)
        live = set(self.generator.uids)  # rows cancelled mid-canvas got no response
        self._drop([u for u in uids if u in self.rows and u not in live])

    def _drop(self, uids):
        if uids:
            self.generator.remove(uids)
            for u in uids:
                self.rows.pop(u, None)

    def _admit(self, block: bool) -> List[Job]:
        """The queued jobs whose rows fit the batch now, in order."""
        start, rows = [], self.active_rows
        while self.running:
            job = self.waiting
            if job is None:
                try:
                    job = self.queue.get(timeout=0.2) if block else self.queue.get_nowait()
                except queue.Empty:
                    break
            self.waiting = None
            if job.cancelled.is_set():
                continue
            if rows + job.n > self.max_batch:
                self.waiting = job  # joins at a later canvas boundary
                break
            start.append(job)
            rows += job.n
            block = False
        return start

    def _guard(self, job, fn):
        try:
            fn()
        except Exception as e:
            job.on_error(f"internal error: {type(e).__name__}: {e}")

    def _start(self, job: Job):
        """Encodes the prompt (after its longest kept prefix) and adds the job's rows."""
        # Equal tokens with other images are another prompt, and an infilling prompt is read
        # with its canvas's suffix: such prompts are not kept.
        store = self.store if not (job.images or job.pins) else PromptStore(0)
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
        for i in range(job.n):
            row = _Row(job, i, cache.copy(), [])
            cancelled = job.cancelled.is_set
            on_draft = (lambda d, _i=i: job.on_draft(_i, d)) if job.drafts else None
            (uid,) = self.generator.insert(
                row.cache,
                job.settings,
                row_key(job.seed, i),
                pins=job.pins,
                on_draft=[on_draft],
                cancelled=[cancelled],
            )
            self.rows[uid] = row

    def _tokens(self, row: _Row, r: CanvasResponse):
        """What the row's client gets of this canvas: its tokens and finish reason."""
        if row.job.gap is None:
            return r.tokens, r.finish_reason
        start, n = row.job.gap  # infilling: the gap's tokens, cut at its first EOS
        return cut_at_eos(r.committed[start : start + n], self.generator.eos)[0], "stop"

    def _report(self, responses: List[CanvasResponse]) -> set:
        """Each row's canvas to its job (rank 0's clients); the uids of rows their client
        ended: gone, or cut by a stop string."""
        ended = set()
        for r in responses:
            row = self.rows[r.uid]
            if row.job.cancelled.is_set():
                ended.add(r.uid)
                continue
            tokens, finish = self._tokens(row, r)
            if row.job.on_tokens(row.index, tokens, finish):  # a stop string cut the text
                ended.add(r.uid)
                finish = "stop"
            if finish is not None:
                row.job.on_done(row.index, finish)
        return ended

    def _settle(self, r: CanvasResponse, ended: bool):
        """A row's canvas kept (the same on every rank): a finished reply joins the prompt
        store for the conversation's next turn; a row its client ended leaves."""
        row = self.rows[r.uid]
        tokens, finish = self._tokens(row, r)
        row.tokens += tokens
        if ended:
            self._drop([r.uid])
            return
        if finish is None:
            return
        self._drop([r.uid])
        if self.store.max_entries > 0 and not (row.job.images or row.job.pins):
            reply = r.tokens + ([] if r.stop_token is None else [r.stop_token])  # for turn 2
            if reply:
                self.model.encode(
                    mx.array([reply], dtype=mx.int32), row.cache, step=self.prefill_step_size
                )
            self.store.insert(row.job.prompt + row.tokens + reply[len(r.tokens) :], row.cache)
