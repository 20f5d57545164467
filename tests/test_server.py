"""The real server on a free loopback port, driven by the `openai` client and raw sockets."""

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen([sys.executable, "-m", "mlx_diffusiongemma.server", "--port", "0"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    port = None
    deadline = time.time() + 120
    lines = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    assert port, "".join(lines)
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)


def health(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/health")
    return json.loads(c.getresponse().read())


def raw(port, path, body, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    return r.status, r.read().decode()


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == ["diffusiongemma-demo"]
    assert health(server)["status"] == "ok"


def test_chat_completion_plain_and_streamed(server):
    c = client(server)
    kw = dict(model="x", messages=[{"role": "user", "content": "Hello"}], max_tokens=40, seed=3,
              extra_body={"steps": 4})
    r = c.chat.completions.create(**kw)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    chunks = list(c.chat.completions.create(stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # same seed, same text, canvas by canvas
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_and_suffix(server):
    c = client(server)
    r = c.completions.create(model="x", prompt="Once upon a time", max_tokens=32, seed=1, extra_body={"steps": 3})
    assert isinstance(r.choices[0].text, str) and r.object == "text_completion"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="x", prompt="Once upon a time", max_tokens=32, seed=1, stream=True, extra_body={"steps": 3}))
    assert streamed == r.choices[0].text
    fill = c.completions.create(model="x", prompt="def f(x):\n    return", suffix="\n\nprint(f(2))", seed=0,
                                extra_body={"steps": 3, "gap_length": 5})
    assert isinstance(fill.choices[0].text, str)


def test_draft_events_are_opt_in(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32, "seed": 0, "steps": 5,
            "stream": True, "drafts": True}
    status, text = raw(server, "/v1/chat/completions", body)
    assert status == 200
    drafts = [json.loads(b.split("data: ", 1)[1]) for b in text.split("\n\n") if b.startswith("event: draft")]
    assert drafts and [d["draft"]["step"] for d in drafts if d["draft"]["canvas"] == 0][:2] == [1, 2]
    status, text = raw(server, "/v1/chat/completions", {**body, "drafts": False})
    assert "event: draft" not in text and text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("body, msg", [
    (b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 9}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "t_min": 0.9, "t_max": 0.1},
     "t_max must be greater"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"role": "user", "content": "x"}], "t_min": float("nan")},
     "t_min must be a finite number"),
    ({"messages": [{"role": "user", "content": "x"}], "t_max": float("inf")},
     "t_max must be a finite number"),
])
def test_bad_requests_get_400_json_and_server_keeps_serving(server, body, msg):
    status, text = raw(server, "/v1/chat/completions", body)
    assert status == 400 and msg in json.loads(text)["error"]["message"]
    assert health(server)["status"] == "ok"


def test_oversized_request(server):
    s = socket.create_connection(("127.0.0.1", server), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 50000000\r\n\r\n{\"prompt\": \"")
    reply = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    reply = reply.decode()
    s.close()
    assert reply.startswith("HTTP/1.1 400") and "exceeds the limit" in reply
    assert health(server)["status"] == "ok"


def test_disconnect_mid_stream_cancels(server):
    before = health(server)["cancelled"]
    body = json.dumps({"prompt": "long story", "max_tokens": 32 * 100, "steps": 48, "stream": True,
                       "drafts": True, "stability_threshold": 1000}).encode()
    s = socket.create_connection(("127.0.0.1", server), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while b"event: draft" not in got:  # it started
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    s.close()
    deadline = time.time() + 60
    while health(server)["cancelled"] == before and time.time() < deadline:
        time.sleep(0.2)
    assert health(server)["cancelled"] == before + 1
    # and the next request is served right away (the generation was stopped, not finished)
    r = client(server).completions.create(model="x", prompt="hi", max_tokens=8, seed=0, extra_body={"steps": 2})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_two_clients_at_once_do_not_interfere(server):
    c = client(server)
    prompts = ["First client says hello", "Second client asks a question"]
    solo = [c.completions.create(model="x", prompt=p, max_tokens=32, seed=7, extra_body={"steps": 4}).choices[0].text
            for p in prompts]
    results = [None, None]

    def go(i):
        results[i] = client(server).completions.create(
            model="x", prompt=prompts[i], max_tokens=32, seed=7, extra_body={"steps": 4}).choices[0].text

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == solo
