"""A request's job: the scheduler's callbacks (on its thread) turned into events on the HTTP
handler's asyncio queue, with each choice's text parsed on the way (stop strings end a row
there, where the scheduler can drop it)."""

import asyncio

from ..denoise import Draft
from .output import ChoiceOutput
from .requests import Parsed
from .scheduler import Job


class Cancelled(Exception):
    pass


class ServedJob(Job):
    """Events: ("start", cached_tokens), ("delta", row, Delta), ("draft", row, Draft),
    ("done", row, finish_reason, completion_tokens), ("error", message, client_fault)."""

    def __init__(self, parsed: Parsed, tokenizer, loop: asyncio.AbstractEventLoop):
        super().__init__(
            parsed.prompt,
            parsed.settings,
            parsed.n,
            parsed.seed,
            parsed.drafts,
            images=parsed.images,
        )
        self.parsed, self.loop = parsed, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.outputs = [
            ChoiceOutput(
                tokenizer,
                parsed.stop,
                parsed.chat,
                parsed.thinking_open,
                parsed.tools,
                parsed.parallel_tool_calls,
            )
            for _ in range(parsed.n)
        ]

    def _put(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()

    def on_start(self, cached_tokens):
        self._put("start", cached_tokens)

    def on_tokens(self, row, tokens, finish):
        out = self.outputs[row]
        delta = out.feed(tokens, final=finish is not None)
        if delta:
            self._put("delta", row, delta)
        return out.finished

    def on_draft(self, row, draft: Draft):
        self._put("draft", row, draft)

    def on_done(self, row, finish):
        out = self.outputs[row]
        if finish == "stop" and out.sent.tool_calls:
            finish = "tool_calls"
        self._put("done", row, finish, out.returned_tokens)

    def on_error(self, message, client_fault=False):
        self._put("error", message, client_fault)


def infill_runner(model, tokenizer):
    """The scheduler's run_alone for a completion with a suffix: the gap is filled on its own
    (pinned tokens, one canvas), with drafts, and cancelled at the next step once the client
    has gone."""
    from ..infilling import Gap, infill

    def run(job: ServedJob):
        p, s = job.parsed, job.parsed.settings

        def on_draft(d):
            if job.cancelled.is_set():
                raise Cancelled()
            if job.drafts:
                job.on_draft(0, d)

        job.on_start(0)
        try:
            res = infill(
                model,
                tokenizer,
                [p.text_prompt, Gap(p.gap_length), p.suffix],
                draft_callback=on_draft,
                seed=p.seed,
                settings=s,
            )
        except Cancelled:
            return
        except ValueError as e:  # the gap does not fit the canvas, ...
            job.on_error(str(e), client_fault=True)
            return
        job.on_tokens(0, res.fill_tokens[0], "stop")
        job.on_done(0, "stop")

    return run
