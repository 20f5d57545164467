"""An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health.

`python -m mlx_diffusiongemma.server [--model PATH] [--port 8080]`. Binds 127.0.0.1 by default.
Streams one SSE chunk per committed canvas; with `"drafts": true` in the request it also sends
every denoising step as an `event: draft` chunk (choices empty, a `draft` object instead).
Requests are served one generation at a time by a worker thread (the others wait their turn);
a client that disconnects cancels its generation at the next denoising step."""

import argparse
import json
import select
import socket
import sys
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .generation import stream_generate

MAX_BODY = 1 << 20  # bytes


class BadRequest(ValueError):
    pass


class ClientGone(Exception):
    pass


class Job:
    """One generation: `run(on_draft)` is called on the worker thread; events come back on
    `events` as (kind, payload): ("draft", Draft), ("response", r), ("error", message), ("done", None)."""

    def __init__(self, run):
        self.run = run
        self.events = queue.Queue()
        self.cancelled = threading.Event()


class State:
    """The model, and the one worker thread that runs every generation in turn (MLX streams
    belong to the thread that made them; requests queue for it)."""

    def __init__(self, model, tokenizer, name, max_tokens_limit):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_tokens_limit = max_tokens_limit
        self.counts = {"served": 0, "cancelled": 0, "rejected": 0}
        self.jobs = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name="generation").start()

    def _work(self):
        import mlx.core as mx

        mx.set_default_stream(mx.new_stream(mx.default_device()))  # streams are per thread
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                continue

            def on_draft(d, job=job):
                if job.cancelled.is_set():
                    raise ClientGone()
                job.events.put(("draft", d))

            try:
                for r in job.run(on_draft):
                    job.events.put(("response", r))
            except ClientGone:
                pass
            except ValueError as e:
                job.events.put(("error", str(e)))
            except Exception as e:  # keep serving; report it to this request only
                job.events.put(("error", f"internal error: {e}"))
            job.events.put(("done", None))


def _client_gone(sock) -> bool:
    try:
        ready, _, _ = select.select([sock], [], [], 0)
        return bool(ready) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _int(body, key, default=None, lo=1, hi=None):
    v = body.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        raise BadRequest(f"'{key}' must be an integer in [{lo}, {hi if hi is not None else '∞'}]")
    return v


def _float(body, key):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{key}' must be a number")
    return float(v)


def sampler_kwargs(body, state):
    limit = state.max_tokens_limit
    max_tokens = _int(body, "max_completion_tokens", hi=limit) or _int(body, "max_tokens", hi=limit)
    return dict(
        max_tokens=max_tokens, max_denoising_steps=_int(body, "steps", hi=1000), seed=_int(body, "seed", lo=0),
        entropy_bound=_float(body, "entropy_bound"), t_min=_float(body, "t_min"), t_max=_float(body, "t_max"),
        stability_threshold=_int(body, "stability_threshold", lo=0),
        confidence_threshold=_float(body, "confidence_threshold"),
    )


def chat_prompt(body, tokenizer):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message needs a 'role' and 'content'")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise BadRequest("message 'content' must be text")
        clean.append({"role": m["role"], "content": content})
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise BadRequest("this model has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=bool(body.get("enable_thinking", False)))
    return list(tokenizer.encode(text, add_special_tokens=False))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State = None

    def log_message(self, fmt, *args):  # quiet unless asked
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    # ---- plumbing ------------------------------------------------------------------------
    def _json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code, message, kind="invalid_request_error"):
        self._json(code, {"error": {"message": message, "type": kind, "code": code}})

    def _read_body(self):
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        if n > MAX_BODY:
            self.close_connection = True
            self._drain()
            raise BadRequest(f"request body of {n} bytes exceeds the limit of {MAX_BODY}")
        try:
            body = json.loads(self.rfile.read(n) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    def _drain(self, limit=MAX_BODY, wait=0.05):
        """Reads what the client already sent of a refused body, so closing the socket does not
        reset the connection before it gets the error reply."""
        sock = self.connection
        sock.settimeout(wait)
        try:
            while limit > 0:
                chunk = sock.recv(min(65536, limit))
                if not chunk:
                    break
                limit -= len(chunk)
        except OSError:
            pass
        finally:
            sock.settimeout(None)

    def _sse(self, obj, event=None):
        """Sends one SSE event, starting the event stream on the first one (so that errors found
        before any output still get a plain 400)."""
        data = (f"event: {event}\n" if event else "") + f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n"
        try:
            if not getattr(self, "_sse_started", False):
                self._sse_started = True
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
            self.wfile.write(data.encode())
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise ClientGone() from None

    # ---- routes --------------------------------------------------------------------------
    def do_GET(self):
        if self.path == "/health":
            return self._json(200, {"status": "ok", **self.state.counts})
        if self.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [
                {"id": self.state.name, "object": "model", "created": 0, "owned_by": "mlx-diffusiongemma"}]})
        self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self):
        self._sse_started = False
        try:
            body = self._read_body()
            if self.path == "/v1/chat/completions":
                prompt, chat = chat_prompt(body, self.state.tokenizer), True
            elif self.path == "/v1/completions":
                prompt, chat = body.get("prompt"), False
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))):
                    raise BadRequest("'prompt' must be a string or a list of token ids")
            else:
                return self._error(404, f"no route {self.path}", "not_found")
            self._generate(body, prompt, chat)
            self.state.counts["served"] += 1
        except BadRequest as e:
            self.state.counts["rejected"] += 1
            self._error(400, str(e))
        except ClientGone:
            self.state.counts["cancelled"] += 1
            self.close_connection = True

    def _generate(self, body, prompt, chat):
        st = self.state
        kw = sampler_kwargs(body, st)
        stream, drafts = bool(body.get("stream", False)), bool(body.get("drafts", False))
        suffix = body.get("suffix") if not chat else None
        if suffix is not None and (not isinstance(suffix, str) or not isinstance(prompt, str)):
            raise BadRequest("'suffix' needs a text prompt and a text suffix")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        chunk_kind = f"{kind}.chunk" if chat else kind
        head = {"id": rid, "object": chunk_kind, "created": created, "model": st.name}

        if suffix is not None:
            from .infill import Gap, infill

            kw.pop("max_tokens")
            gap = _int(body, "gap_length")

            def run(on_draft):
                res = infill(st.model, st.tokenizer, [prompt, Gap(gap), suffix], draft_callback=on_draft, **kw)
                yield res
        else:
            def run(on_draft):
                return stream_generate(st.model, st.tokenizer, prompt, draft_callback=on_draft,
                                       apply_chat_template=False, **kw)

        def choice(text, finish, delta):
            if chat:
                key = "delta" if delta else "message"
                msg = {"content": text} if delta else {"role": "assistant", "content": text}
                return {"index": 0, key: msg, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        job = Job(run)
        st.jobs.put(job)
        text, last, first = "", None, True
        try:
            while True:
                try:
                    kind_, payload = job.events.get(timeout=0.25)
                except queue.Empty:
                    if _client_gone(self.connection):
                        raise ClientGone() from None
                    continue
                if kind_ == "done":
                    break
                if kind_ == "error":
                    if getattr(self, "_sse_started", False):  # too late for a status code
                        self._sse({"error": {"message": payload, "type": "invalid_request_error"}})
                        return
                    raise BadRequest(payload)
                if kind_ == "draft":
                    if stream and drafts:
                        d = payload
                        self._sse({**head, "choices": [], "draft": {
                            "canvas": d.canvas, "step": d.step, "tokens": d.tokens, "accepted": sum(d.accepted),
                            "mean_entropy": d.mean_entropy,
                            "text": st.tokenizer.decode(d.tokens) if st.tokenizer is not None else ""}}, event="draft")
                    continue
                r = payload
                if suffix is not None:  # an InfillResult
                    last_text, finish, usage = r.fills[0], "stop", {"prompt_tokens": 0, "completion_tokens": len(r.fill_tokens[0])}
                else:
                    last_text, finish, usage = r.text, r.finish_reason, _usage(r)
                last = (finish, usage)
                text += last_text
                if stream:
                    if chat and first:
                        self._sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "finish_reason": None}]})
                    first = False
                    self._sse({**head, "choices": [choice(last_text, finish, True)]})
        except ClientGone:
            job.cancelled.set()
            raise
        finish, usage = last
        usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
        if stream:
            if (body.get("stream_options") or {}).get("include_usage"):
                self._sse({**head, "choices": [], "usage": usage})
            self._sse("[DONE]")
            return
        self._json(200, {"id": rid, "object": kind, "created": created, "model": st.name,
                         "choices": [choice(text, finish, False)], "usage": usage})


def _usage(r):
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generation_tokens}


def make_server(model, tokenizer, name, host="127.0.0.1", port=8080, max_tokens_limit=32768):
    state = State(model, tokenizer, name, max_tokens_limit)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv=None):
    from .cli import add_model_argument, load_for_cli, one_line_errors

    p = argparse.ArgumentParser(prog="mlx_diffusiongemma.server", description="OpenAI-compatible DiffusionGemma server.")
    add_model_argument(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-tokens-limit", type=int, default=32768, help="largest max_tokens a request may ask")
    p.add_argument("--verbose", action="store_true", help="log requests")
    args = p.parse_args(argv)
    name = args.model or "diffusiongemma-demo"
    with one_line_errors():
        model, tokenizer = load_for_cli(args.model, adapter_path=args.adapter_path)
        server = make_server(model, tokenizer, name, args.host, args.port, args.max_tokens_limit)
    server.verbose = args.verbose
    print(f"Serving {name} on http://{args.host}:{server.server_address[1]}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
