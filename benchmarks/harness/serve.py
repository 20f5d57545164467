"""`serve`: the server's continuous batching. N requests of --request-tokens tokens each, sent
at once from N client threads, against the same N requests sent in turn; wall time and tok/s.
The server runs in this process on loopback (uvicorn in a thread, HTTP clients in others);
every request runs all its denoising steps (no early stop) and ignores EOS, so both ways do
the same work. With a seed per request, the concurrent answers are checked to be the ones
served in turn (where the model has a tokenizer: the mid-size checkpoint has none). Figures
are medians of --repeat rounds, each round one of each."""

import http.client
import json
import socket
import statistics
import threading
import time

from mlx_diffusiongemma.bench.common import random_prompt, say
from mlx_diffusiongemma.bench.shapes import NO_STOP

from .common import ensure_mid_checkpoint


def _start(model, tokenizer, max_batch):
    from mlx_diffusiongemma.server import build_state, make_server

    state = build_state(model, tokenizer, "bench", max_batch=max_batch, prompt_cache_size=0)
    state.scheduler.eos = []  # every request returns all the tokens it asks for
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = make_server(state, sock, max_connections=4 * max_batch + 8)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return state, server, thread, sock.getsockname()[1]


def _post(port, body):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    if r.status != 200:
        raise RuntimeError(f"request failed: {data}")
    return data["choices"][0]["text"], data["usage"]["completion_tokens"]


def _at_once(port, bodies):
    out = [None] * len(bodies)

    def go(i):
        out[i] = _post(port, bodies[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def section_serve(o, rep):
    from mlx_diffusiongemma.cli import DEMO_MODEL
    from mlx_diffusiongemma.loader import load, load_model

    rep.header("serve")
    if o.server_model == "demo":
        model, tokenizer = load(DEMO_MODEL)
    else:
        model, tokenizer = load_model(ensure_mid_checkpoint(o.workdir)), None
    args = model.args
    say(
        f"  model: {o.server_model} ({args.num_hidden_layers} layers, hidden {args.hidden_size}, "
        f"canvas {args.canvas_length}, vocab {args.vocab_size}); {o.request_tokens}-token "
        f"requests, {o.steps} steps per canvas, {o.prompt}-token prompts"
    )
    state, server, thread, port = _start(model, tokenizer, max(o.concurrency))
    bodies = [
        {
            "prompt": random_prompt(o.prompt, args.vocab_size, seed=i),
            "max_tokens": o.request_tokens,
            "steps": o.steps,
            "confidence_threshold": NO_STOP,
            "seed": o.seed + i,
        }
        for i in range(max(o.concurrency))
    ]
    try:
        _post(port, bodies[0])  # warm-up: compiled graphs, first allocations
        for n in o.concurrency:
            seq, con, rows, runs = [], [], 0, 0
            for _ in range(o.repeat):  # alternated, so a busy spell on the machine hits both
                t = time.perf_counter()
                in_turn = [_post(port, b) for b in bodies[:n]]
                seq.append(time.perf_counter() - t)
                before = dict(state.scheduler.stats)
                t = time.perf_counter()
                together = _at_once(port, bodies[:n])
                con.append(time.perf_counter() - t)
                rows += state.scheduler.stats["canvas_rows"] - before["canvas_rows"]
                runs += state.scheduler.stats["canvases"] - before["canvases"]
            sequential, concurrent = statistics.median(seq), statistics.median(con)
            tokens = sum(k for _, k in together)
            same = (
                None if tokenizer is None else [a[0] for a in together] == [a[0] for a in in_turn]
            )  # no tokenizer, no text to compare
            verdict = {None: "not compared", True: "equal", False: "DIFFER"}[same]
            say(
                f"  {n} requests: in turn {sequential:6.2f} s ({tokens / sequential:6.1f} tok/s), "
                f"at once {concurrent:6.2f} s ({tokens / concurrent:6.1f} tok/s): "
                f"{concurrent / sequential:.2f}x the time; {rows / max(runs, 1):.2f} rows per "
                f"canvas; answers {verdict} (median of {o.repeat})"
            )
            rep.save(
                "serve",
                {
                    "model": o.server_model,
                    "requests": n,
                    "tokens": tokens,
                    "sequential_s": sequential,
                    "concurrent_s": concurrent,
                    "sequential_runs": seq,
                    "concurrent_runs": con,
                    "ratio": concurrent / sequential,
                    "rows_per_canvas": rows / max(runs, 1),
                    "answers_equal": same,
                    "steps": o.steps,
                    "prompt": o.prompt,
                },
            )
    finally:
        server.should_exit = True
        thread.join(30)
        state.scheduler.stop()
