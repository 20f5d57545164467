"""A bounded soak on loopback: a few hundred mixed requests from several clients at once
(completions, chat streams read whole or dropped midway, n > 1, malformed and oversized bodies,
HTTP garbage). Afterwards the server still answers, its memory is back near where it was after
a warm-up, and the /health counters add up."""

import json
import random
import socket
import threading
import time
from pathlib import Path

from test_server import client, health, start_server

REQUESTS = 240
CLIENTS = 6
TIME_LIMIT = 150  # seconds: the soak stops early rather than run long on a busy machine


def rss(pid) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def post(port, path, body: bytes, read_all=True, timeout=120):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    got = s.recv(65536)
    while read_all:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    return got


def one(port, kind, rng):
    """Sends one request of `kind`; returns the expected outcome ('served', 'rejected', ...)."""
    prompt = f"soak {rng.randrange(10**6)}"
    if kind == "completion":
        body = {
            "prompt": prompt,
            "max_tokens": rng.choice([1, 8, 40]),
            "steps": 2,
            "n": rng.choice([1, 2]),
        }
        assert post(port, "/v1/completions", json.dumps(body).encode()).startswith(b"HTTP/1.1 200")
    elif kind == "stream":
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 40,
            "steps": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        assert b"data: [DONE]" in post(port, "/v1/chat/completions", json.dumps(body).encode())
    elif kind == "dropped":
        body = {
            "prompt": prompt,
            "max_tokens": 32 * 20,
            "steps": 8,
            "stream": True,
            "stability_threshold": 1000,
        }
        post(port, "/v1/completions", json.dumps(body).encode(), read_all=False)
    elif kind == "malformed":
        body = rng.choice(
            [
                b"{not json",
                b"[" * 5000 + b"]" * 5000,
                b'{"prompt": 5}',
                b'{"prompt": "x", "top_p": 0.1}',
                b'{"prompt": "\\udc00"}',
            ]
        )
        assert post(port, "/v1/completions", body).startswith(b"HTTP/1.1 400")
    elif kind == "oversized":
        body = json.dumps({"prompt": "x" * 100_000}).encode()
        assert post(port, "/v1/completions", body).startswith(b"HTTP/1.1 413")
    else:  # garbage at the HTTP level: never reaches the routes
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(
            rng.choice(
                [
                    b"GARBAGE\r\n\r\n",
                    b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                    b"\x16\x03\x01\x02\x00",
                ]
            )
        )
        try:
            s.recv(4096)
        except ConnectionResetError:  # refused and closed before the rest was read: a reset
            pass
        s.close()


KINDS = (
    ["completion"] * 4
    + ["stream"] * 3
    + ["dropped"] * 2
    + ["malformed"] * 2
    + ["oversized", "garbage"]
)


def test_soak(text_demo):
    proc, port = start_server(
        "--model",
        str(text_demo),
        "--max-body-bytes",
        "65536",
        "--max-batch",
        "4",
        "--body-timeout",
        "5",
        "--header-timeout",
        "5",
    )
    try:
        warm = random.Random(0)
        for kind in ("completion", "stream", "dropped", "malformed", "oversized"):
            for _ in range(3):
                one(port, kind, warm)
        time.sleep(1.0)
        start_rss = rss(proc.pid)
        sent, errors, lock = [0], [], threading.Lock()
        deadline = time.time() + TIME_LIMIT

        def worker(seed):
            rng = random.Random(seed)
            while time.time() < deadline:
                with lock:
                    if sent[0] >= REQUESTS:
                        return
                    sent[0] += 1
                try:
                    one(port, rng.choice(KINDS), rng)
                except Exception as e:  # collected: the assertion below shows them
                    errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIME_LIMIT + 120)
        assert not errors, errors[:5]
        assert sent[0] >= min(REQUESTS, 60)
        deadline = time.time() + 60
        while time.time() < deadline:
            h = health(port)
            if h["in_flight"] == 0 and h["active_rows"] == 0 and h["queued"] == 0:
                break
            time.sleep(0.2)
        assert h["requests"] == h["served"] + h["cancelled"] + h["rejected"] + h["failed"]
        assert h["failed"] == 0 and h["in_flight"] == 0 and h["active_rows"] == 0
        r = client(port).completions.create(
            model="x", prompt="still there?", max_tokens=4, extra_body={"steps": 2}
        )
        assert r.choices[0].finish_reason in ("stop", "length")
        end_rss = rss(proc.pid)
        print(f"soak: {sent[0]} requests, RSS {start_rss >> 20} -> {end_rss >> 20} MiB; {h}")
        assert end_rss < start_rss * 1.5 + 64 * 2**20, (start_rss, end_rss)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
