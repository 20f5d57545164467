"""A request's job: the scheduler's callbacks (on its thread) turned into events on the HTTP
handler's asyncio queue, with each choice's text parsed on the way (stop strings end a row
there, where the scheduler can drop it)."""

import asyncio

from ..denoise import Draft
from .output import ChoiceOutput
from .requests import Parsed
from .scheduler import Job


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
            pins=parsed.pins,
            gap=parsed.gap,
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
