"""The routes: /v1/chat/completions, /v1/completions, /v1/models, /health (a starlette app).

Every answer that is not a completion is a JSON error: 4xx for the request's faults (named
field, oversized or slow body, full queue), 500 for ours. Each request ends in exactly one of
the /health outcomes: served, cancelled (the client left), rejected (4xx) or failed (5xx)."""

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .jobs import ServedJob
from .requests import RequestError, decode_body, parse
from .scheduler import QueueFull, Scheduler

log = logging.getLogger("mlx_diffusiongemma.server")


@dataclass
class Limits:
    max_body: int = 1 << 20  # bytes
    body_timeout: float = 30.0  # seconds to receive a whole body
    max_tokens: int = 32768  # the largest max_tokens a request may ask


@dataclass
class ServerState:
    model: object
    tokenizer: object
    name: str
    scheduler: Scheduler
    limits: Limits = field(default_factory=Limits)
    api_key: Optional[str] = None  # when set, /v1/... needs `Authorization: Bearer <api_key>`
    counts: dict = field(
        default_factory=lambda: dict.fromkeys(
            ("requests", "served", "cancelled", "rejected", "failed"), 0
        )
    )

    def health(self) -> dict:
        c = self.counts
        in_flight = c["requests"] - c["served"] - c["cancelled"] - c["rejected"] - c["failed"]
        sch = self.scheduler
        return {
            "status": "ok" if sch.thread.is_alive() else "down",
            **c,
            "in_flight": in_flight,
            "queued": sch.queued,
            "active_rows": sch.active_rows,
            "prompt_cache_entries": len(sch.store),
            **sch.stats,
        }


class ClientGone(Exception):
    pass


def _error(e: RequestError, close=False) -> JSONResponse:
    headers = {"Connection": "close"} if close else {}
    if e.status in (429, 503):
        headers["Retry-After"] = "1"
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _read_body(request: Request, limits: Limits) -> bytes:
    """The body, bounded in size and time; chunked bodies too (uvicorn de-chunks them)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body:
        raise RequestError(
            f"request body of {declared} bytes exceeds the limit of {limits.max_body}", status=413
        )
    chunks, size = [], 0

    async def read():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body:
                raise RequestError(
                    f"request body exceeds the limit of {limits.max_body} bytes", status=413
                )
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limits.body_timeout)
    except asyncio.TimeoutError:
        raise RequestError(
            f"request body not received within {limits.body_timeout:g} s", status=408
        ) from None
    except ClientDisconnect:
        raise ClientGone() from None
    return b"".join(chunks)


def create_app(state: ServerState) -> Starlette:
    async def health(request):
        return JSONResponse(state.health())

    async def models(request):
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": state.name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "mlx-diffusiongemma",
                    }
                ],
            }
        )

    async def chat(request):
        return await _complete(request, state, chat=True)

    async def completions(request):
        return await _complete(request, state, chat=False)

    async def http_error(request, exc: HTTPException):
        return _error(
            RequestError(
                exc.detail if exc.status_code != 404 else f"no route {request.url.path}",
                status=exc.status_code,
                kind="not_found" if exc.status_code == 404 else "invalid_request_error",
            )
        )

    async def server_error(request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(
            {
                "error": {
                    "message": "internal server error",
                    "type": "server_error",
                    "param": None,
                    "code": 500,
                }
            },
            status_code=500,
        )

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error}
    )
    return app if state.api_key is None else require_key(app, state.api_key)


def bearer_token(scope) -> Optional[bytes]:
    """The token of the request's first Authorization header, if its scheme is Bearer."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def require_key(app, api_key: str):
    """`app` behind an API key, checked before routing and before any body is read, in constant
    time: every path under /v1 answers a 401 JSON error without the right Bearer token (OpenAI's
    convention; vLLM's too). /health stays open, for load balancers and liveness probes; it
    shows counts, never requests."""
    expected = api_key.encode()

    async def guarded(scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            token = bearer_token(scope)
            if token is None or not hmac.compare_digest(token, expected):
                e = RequestError(
                    "a valid API key is required: send 'Authorization: Bearer <key>'",
                    status=401,
                    kind="invalid_request_error",
                )
                response = _error(e)
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


async def _complete(request: Request, state: ServerState, chat: bool):
    counts = state.counts
    counts["requests"] += 1
    try:
        body = decode_body(await _read_body(request, state.limits))
        parsed = await run_in_threadpool(
            parse, body, chat, state.model, state.tokenizer, state.limits.max_tokens
        )
        job = ServedJob(parsed, state.tokenizer, asyncio.get_running_loop())
        try:
            state.scheduler.submit(job)
        except QueueFull:
            raise RequestError(
                "the server's queue is full; retry shortly", status=429, kind="rate_limit_error"
            ) from None
        except ValueError as e:
            raise RequestError(str(e), "n") from None
    except RequestError as e:
        counts["rejected"] += 1
        return _error(e, close=e.status in (408, 413))
    except ClientGone:
        counts["cancelled"] += 1
        return Response(status_code=499)  # nobody reads it
    except Exception:  # ours, not the client's: logged, and the request still ends counted
        log.exception("internal error while reading a request")
        counts["failed"] += 1
        return _error(RequestError("internal server error", status=500, kind="server_error"))
    if not state.scheduler.thread.is_alive():
        job.cancelled.set()
        counts["failed"] += 1
        return _error(
            RequestError("the generation worker has stopped", status=503, kind="server_error")
        )
    reply = Reply(state, job, chat)
    if parsed.stream:
        return StreamingResponse(
            reply.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    return await reply.collect(request)


class Reply:
    """A job's events as an OpenAI response: SSE chunks, or one JSON body."""

    def __init__(self, state: ServerState, job: ServedJob, chat: bool):
        self.state, self.job, self.chat = state, job, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.cached = 0
        self.finish = [None] * job.n
        self.completion_tokens = [0] * job.n
        self.calls = [0] * job.n  # tool calls streamed per choice (their index)

    def _head(self, chunk=False):
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.state.name}

    def _usage(self):
        p = len(self.job.prompt)
        c = sum(self.completion_tokens)
        return {
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }

    def _draft(self, row, d):
        tok = self.state.tokenizer
        return {
            **self._head(True),
            "choices": [],
            "draft": {
                "index": row,
                "canvas": d.canvas,
                "step": d.step,
                "tokens": d.tokens,
                "accepted": sum(d.accepted),
                "mean_entropy": d.mean_entropy,
                "text": tok.decode(d.tokens) if tok is not None else "",
            },
        }

    def _delta(self, row, delta):
        if not self.chat:
            return {"index": row, "text": delta.content, "finish_reason": None, "logprobs": None}
        out = {}
        if delta.reasoning:
            out["reasoning_content"] = delta.reasoning
        if delta.content:
            out["content"] = delta.content
        if delta.tool_calls:
            out["tool_calls"] = []
            for tc in delta.tool_calls:
                out["tool_calls"].append({"index": self.calls[row], **tc})
                self.calls[row] += 1
        return {"index": row, "delta": out, "finish_reason": None, "logprobs": None}

    def _final(self, row, finish):
        if self.chat:
            return {"index": row, "delta": {}, "finish_reason": finish, "logprobs": None}
        return {"index": row, "text": "", "finish_reason": finish, "logprobs": None}

    def _message(self, row):
        sent = self.job.outputs[row].sent
        if not self.chat:
            return {
                "index": row,
                "text": sent.content,
                "finish_reason": self.finish[row],
                "logprobs": None,
            }
        msg = {
            "role": "assistant",
            "content": sent.content if (sent.content or not sent.tool_calls) else None,
        }
        if sent.reasoning:
            msg["reasoning_content"] = sent.reasoning
        if sent.tool_calls:
            msg["tool_calls"] = sent.tool_calls
        return {"index": row, "message": msg, "finish_reason": self.finish[row], "logprobs": None}

    def _record(self, event):
        """Bookkeeping shared by both forms; returns (kind, error) for errors."""
        kind = event[0]
        if kind == "start":
            self.cached = event[1]
        elif kind == "done":
            self.finish[event[1]], self.completion_tokens[event[1]] = event[2], event[3]

    async def stream(self):
        counts, job, outcome = self.state.counts, self.job, "cancelled"

        def sse(obj, event=None):
            return (f"event: {event}\n" if event else "") + f"data: {json.dumps(obj)}\n\n"

        try:
            if self.chat:
                for row in range(job.n):
                    yield sse(
                        {
                            **self._head(True),
                            "choices": [
                                {
                                    "index": row,
                                    "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None,
                                    "logprobs": None,
                                }
                            ],
                        }
                    )
            done = 0
            while done < job.n:
                event = await job.events.get()
                self._record(event)
                kind = event[0]
                if kind == "delta":
                    yield sse({**self._head(True), "choices": [self._delta(event[1], event[2])]})
                elif kind == "draft" and job.parsed.drafts:
                    yield sse(self._draft(event[1], event[2]), "draft")
                elif kind == "done":
                    done += 1
                    yield sse({**self._head(True), "choices": [self._final(event[1], event[2])]})
                elif kind == "error":
                    outcome = "rejected" if event[2] else "failed"
                    yield sse(
                        {
                            "error": {
                                "message": event[1],
                                "type": "invalid_request_error" if event[2] else "server_error",
                                "param": None,
                                "code": 400 if event[2] else 500,
                            }
                        }
                    )
                    yield "data: [DONE]\n\n"
                    return
            if job.parsed.include_usage:
                yield sse({**self._head(True), "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
            outcome = "served"
        finally:  # also when the client leaves: starlette cancels this generator
            if outcome == "cancelled":
                job.cancelled.set()
            counts[outcome] += 1

    async def collect(self, request: Request):
        counts, job, done = self.state.counts, self.job, 0
        while done < job.n:
            try:
                event = await asyncio.wait_for(job.events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    counts["cancelled"] += 1
                    return Response(status_code=499)
                continue
            self._record(event)
            if event[0] == "done":
                done += 1
            elif event[0] == "error":
                client_fault = event[2]
                counts["rejected" if client_fault else "failed"] += 1
                return _error(
                    RequestError(
                        event[1],
                        status=400 if client_fault else 500,
                        kind="invalid_request_error" if client_fault else "server_error",
                    )
                )
        counts["served"] += 1
        return JSONResponse(
            {
                **self._head(),
                "choices": [self._message(r) for r in range(job.n)],
                "usage": self._usage(),
            }
        )
