"""An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health.

`python -m mlx_diffusiongemma.server [--model PATH] [--port 8080]`. Binds 127.0.0.1 by default;
a --host other machines can reach needs --api-key (or an explicit --no-api-key).
uvicorn serves HTTP (framing, chunked bodies, keep-alive, connection limits, with a deadline
for request heads: serving/http.py); the routes are serving/app.py; requests that arrive while
others run join their batch at the next canvas (serving/scheduler.py). Under `mlx.launch` the
model is split across the ranks: rank 0 serves HTTP, the others follow its scheduler
(serving/ranks.py)."""

import argparse
import contextlib
import ipaddress
import logging
import os
import socket
import sys

API_KEY_ENV = "MLX_DIFFUSIONGEMMA_API_KEY"


def build_state(
    model,
    tokenizer,
    name,
    max_batch=8,
    max_queue=64,
    prompt_cache_size=8,
    prompt_cache_bytes=None,
    limits=None,
    api_key=None,
    link=None,
):
    """The server's state; with `link` (several ranks) rank 0's scheduler leads the others."""
    from .serving.app import Limits, ServerState
    from .serving.prompt_store import PromptStore
    from .serving.scheduler import Scheduler

    store = PromptStore(prompt_cache_size, prompt_cache_bytes)
    scheduler = Scheduler(
        model, tokenizer, store, max_batch=max_batch, max_queue=max_queue, link=link
    )
    return ServerState(model, tokenizer, name, scheduler, limits or Limits(), api_key)


def follow(model, tokenizer, args, link):
    """A rank other than 0: rank 0's scheduler turns, until rank 0 stops."""
    from .serving.prompt_store import PromptStore
    from .serving.scheduler import Scheduler

    store = PromptStore(args.prompt_cache_size, args.prompt_cache_bytes)
    Scheduler(model, tokenizer, store, args.max_batch, args.max_queue, link=link).follow()


def loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: other machines may reach it
        return False


def api_key_setting(args, environ=os.environ):
    """The key requests must carry (--api-key, else $MLX_DIFFUSIONGEMMA_API_KEY), or None; a
    host reachable from other machines without one is refused unless --no-api-key says so."""
    if args.no_api_key:
        if args.api_key is not None:
            raise ValueError("--api-key and --no-api-key cannot both be given")
        return None
    key = args.api_key if args.api_key is not None else environ.get(API_KEY_ENV) or None
    if key is not None and (not key.strip() or key != key.strip()):
        raise ValueError("the API key must be non-empty, without spaces around it")
    if key is None and not loopback(args.host):
        raise ValueError(
            f"--host {args.host} can be reached from other machines: pass --api-key KEY (or set "
            f"{API_KEY_ENV}) so that requests need it, or --no-api-key to serve without one"
        )
    return key


def ranks_link():
    """The link to the other ranks when launched on several (`mlx.launch`), else None."""
    from .cli import launched

    if not launched():
        return None
    import mlx.core as mx

    from .serving.ranks import RankLink

    group = mx.distributed.init()
    return RankLink(group) if group.size() > 1 else None


def make_server(
    state, sock, max_connections=64, keep_alive_timeout=5, header_timeout=10.0, verbose=False
):
    """A uvicorn server for `state` on the bound socket `sock` (run it with
    `server.run(sockets=[sock])`)."""
    import uvicorn

    from .serving.app import create_app
    from .serving.http import Protocol

    protocol = type("Protocol", (Protocol,), {"header_timeout": header_timeout})
    config = uvicorn.Config(
        create_app(state),
        http=protocol,
        lifespan="off",
        limit_concurrency=max_connections,
        timeout_keep_alive=keep_alive_timeout,
        access_log=verbose,
        log_level="info" if verbose else "warning",
        ws="none",
    )
    return uvicorn.Server(config)


def main(argv=None):
    from .cli import (
        add_distributed_arguments,
        add_model_argument,
        load_for_cli,
        one_line_errors,
        port_number,
    )
    from .serving.app import Limits

    p = argparse.ArgumentParser(
        prog="mlx_diffusiongemma.server", description="OpenAI-compatible DiffusionGemma server."
    )
    add_model_argument(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; one other machines can reach needs --api-key or --no-api-key",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"requests to /v1/... must send 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})",
    )
    p.add_argument(
        "--no-api-key",
        action="store_true",
        help="serve a non-loopback --host without an API key (anyone who can reach it may use it)",
    )
    p.add_argument("--port", type=port_number, default=8080)
    p.add_argument(
        "--max-tokens-limit", type=int, default=32768, help="largest max_tokens a request may ask"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="rows (choices) denoised together; more requests wait in the queue",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting for the batch; beyond it requests get a 429",
    )
    p.add_argument(
        "--prompt-cache-size",
        type=int,
        default=8,
        help="encoded prompts kept across requests (0: none)",
    )
    p.add_argument(
        "--prompt-cache-bytes",
        type=int,
        default=None,
        help="also drop kept prompts beyond this many bytes",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="open connections and requests at once; beyond it a 503",
    )
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a client may take to send a request body",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a client may take to send a request head",
    )
    p.add_argument("--keep-alive-timeout", type=int, default=5)
    p.add_argument("--verbose", action="store_true", help="log requests")
    add_distributed_arguments(p)
    args = p.parse_args(argv)
    name = args.model or "diffusiongemma-demo"
    with one_line_errors():
        for flag in ("max_batch", "max_queue", "max_connections", "max_body_bytes"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
        api_key = api_key_setting(args)
        model, tokenizer = load_for_cli(
            args.model, None, args.adapter_path, args.pipeline, args.pipeline_split
        )
        link = ranks_link()
        if link is not None and not link.leader:
            return follow(model, tokenizer, args, link)
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn takes them
        limits = Limits(args.max_body_bytes, args.body_timeout, args.max_tokens_limit)
        state = build_state(
            model,
            tokenizer,
            name,
            args.max_batch,
            args.max_queue,
            args.prompt_cache_size,
            args.prompt_cache_bytes,
            limits,
            api_key,
            link,
        )
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    server = make_server(
        state,
        sock,
        args.max_connections,
        args.keep_alive_timeout,
        args.header_timeout,
        args.verbose,
    )
    guard = " (API key required)" if api_key else ""
    print(
        f"Serving {name} on http://{args.host}:{sock.getsockname()[1]}{guard}",
        file=sys.stderr,
        flush=True,
    )
    # Ctrl-C ends a lone server quietly; a rank's signal (mlx.launch ending every rank once one
    # has) is one line, as the other launched commands say it
    with one_line_errors() if link is not None else contextlib.suppress(KeyboardInterrupt):
        try:
            server.run(sockets=[sock])
        finally:
            state.scheduler.stop()


if __name__ == "__main__":
    main()
