"""Four requests at once to a server on PORT (a completion, an infilling, a chat with n=2, a
stop string): their choices as one JSON line, for test_server_ranks."""

import json
import sys
import threading
import time
import urllib.request

port = int(sys.argv[1])
for _ in range(600):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health")
        break
    except Exception:
        time.sleep(0.2)


def post(path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    return json.load(urllib.request.urlopen(req))


out = []

bodies = [
    (
        "/v1/completions",
        {"model": "x", "prompt": "Once upon a time", "max_tokens": 40, "seed": 1, "steps": 3},
    ),
    (
        "/v1/completions",
        {
            "model": "x",
            "prompt": "def f(x):\n    return",
            "suffix": "\n\nprint(f(2))",
            "seed": 0,
            "steps": 4,
            "gap_length": 5,
        },
    ),
    (
        "/v1/chat/completions",
        {
            "model": "x",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 40,
            "seed": 2,
            "steps": 3,
            "n": 2,
        },
    ),
    (
        "/v1/completions",
        {"model": "x", "prompt": "Hello", "max_tokens": 40, "seed": 7, "steps": 5, "stop": ["e"]},
    ),
]
res = [None] * len(bodies)


def go(i):
    res[i] = post(*bodies[i])


ts = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
[t.start() for t in ts]
[t.join() for t in ts]
for r in res:
    out.append(
        [
            (c.get("text") or c.get("message", {}).get("content"), c["finish_reason"])
            for c in r["choices"]
        ]
    )
print(json.dumps(out))
