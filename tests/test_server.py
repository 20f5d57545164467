"""The real server on a free loopback port, driven by the `openai` client and raw sockets."""

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parent.parent


LOG: list = []  # the server's stderr


def start_server(*flags, log=None):
    cmd = [sys.executable, "-m", "mlx_diffusiongemma.server", "--port", "0", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    port = None
    deadline = time.time() + 120
    lines = log if log is not None else []
    while time.time() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    assert port, "".join(lines)
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, port


@pytest.fixture(scope="module")
def server(text_demo):
    proc, port = start_server(
        "--model", str(text_demo), "--body-timeout", "2", "--header-timeout", "2", log=LOG
    )
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


def test_models_and_health(server, text_demo):
    assert [m.id for m in client(server).models.list().data] == [str(text_demo)]
    assert health(server)["status"] == "ok"


def test_chat_completion_plain_and_streamed(server):
    c = client(server)
    kw = dict(
        model="x",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=40,
        seed=3,
        extra_body={"steps": 4},
    )
    r = c.chat.completions.create(**kw)
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in (
        "stop",
        "length",
    )
    assert r.usage.prompt_tokens > 0
    chunks = list(c.chat.completions.create(stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content  # same seed, same text, canvas by canvas
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_and_suffix(server):
    c = client(server)
    r = c.completions.create(
        model="x", prompt="Once upon a time", max_tokens=32, seed=1, extra_body={"steps": 3}
    )
    assert isinstance(r.choices[0].text, str) and r.object == "text_completion"
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="x",
            prompt="Once upon a time",
            max_tokens=32,
            seed=1,
            stream=True,
            extra_body={"steps": 3},
        )
    )
    assert streamed == r.choices[0].text
    fill = c.completions.create(
        model="x",
        prompt="def f(x):\n    return",
        suffix="\n\nprint(f(2))",
        seed=0,
        extra_body={"steps": 3, "gap_length": 5},
    )
    assert isinstance(fill.choices[0].text, str)


def test_draft_events_are_opt_in(server):
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 32,
        "seed": 0,
        "steps": 5,
        "stream": True,
        "drafts": True,
    }
    status, text = raw(server, "/v1/chat/completions", body)
    assert status == 200
    drafts = [
        json.loads(b.split("data: ", 1)[1])
        for b in text.split("\n\n")
        if b.startswith("event: draft")
    ]
    assert drafts and [d["draft"]["step"] for d in drafts if d["draft"]["canvas"] == 0][:2] == [
        1,
        2,
    ]
    status, text = raw(server, "/v1/chat/completions", {**body, "drafts": False})
    assert "event: draft" not in text and text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    "body, msg",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": "x"}], "t_min": 0.9, "t_max": 0.1},
            "t_max must be greater",
        ),
        ({"messages": [{"role": "user"}]}, "content"),
        (
            {"messages": [{"role": "user", "content": "x"}], "t_min": float("nan")},
            "t_min must be a finite number",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "t_max": float("inf")},
            "t_max must be a finite number",
        ),
    ],
)
def test_bad_requests_get_400_json_and_server_keeps_serving(server, body, msg):
    status, text = raw(server, "/v1/chat/completions", body)
    assert status == 400 and msg in json.loads(text)["error"]["message"]
    assert health(server)["status"] == "ok"


def test_oversized_request(server):
    s = socket.create_connection(("127.0.0.1", server), timeout=30)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 50000000\r\n\r\n{"prompt": "'
    )
    reply = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        reply += chunk
    reply = reply.decode()
    s.close()
    assert reply.startswith("HTTP/1.1 413") and "exceeds the limit" in reply
    assert health(server)["status"] == "ok"


def test_oversized_body_sent_whole_still_reads_its_413(server):
    # the server refuses before reading the body; closing on unread bytes would reset the
    # connection and could destroy the 413 before the client reads it (it did, half the time)
    body = json.dumps({"prompt": "x" * (2 << 20)}).encode()

    def send():
        s = socket.create_connection(("127.0.0.1", server), timeout=30)
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        s.close()
        return reply

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: send(), range(24)))
    assert all(r.startswith(b"HTTP/1.1 413") for r in replies)


def test_disconnect_mid_stream_cancels(server):
    before = health(server)["cancelled"]
    body = json.dumps(
        {
            "prompt": "long story",
            "max_tokens": 32 * 100,
            "steps": 48,
            "stream": True,
            "drafts": True,
            "stability_threshold": 1000,
        }
    ).encode()
    s = socket.create_connection(("127.0.0.1", server), timeout=60)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
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
    r = client(server).completions.create(
        model="x", prompt="hi", max_tokens=8, seed=0, extra_body={"steps": 2}
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_two_clients_at_once_do_not_interfere(server):
    c = client(server)
    prompts = ["First client says hello", "Second client asks a question"]
    solo = [
        c.completions.create(model="x", prompt=p, max_tokens=32, seed=7, extra_body={"steps": 4})
        .choices[0]
        .text
        for p in prompts
    ]
    results = [None, None]

    def go(i):
        results[i] = (
            client(server)
            .completions.create(
                model="x", prompt=prompts[i], max_tokens=32, seed=7, extra_body={"steps": 4}
            )
            .choices[0]
            .text
        )

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == solo


def error_of(status_text):
    status, text = status_text
    return status, json.loads(text)["error"]


CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "steps": 2}


@pytest.mark.parametrize(
    "extra, name",
    [
        ({"top_p": 0.5}, "top_p"),
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"foo": 1}, "foo"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"n": 100}, "n"),
        ({"stop": 5}, "stop"),
        ({"stream": True, "stream_options": 5}, "stream_options"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"seed": -1}, "seed"),
        ({"temperature": 3}, "temperature"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages[0].content[0].text",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,AAAA"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    ],
)
def test_fields_not_honoured_are_refused_by_name(server, extra, name):
    status, err = error_of(raw(server, "/v1/chat/completions", {**CHAT, **extra}))
    assert status == 400 and err["param"] == name and name.split("[")[0] in err["message"]


def test_images_are_refused_with_the_reason(server):
    body = {
        **CHAT,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            }
        ],
    }
    # the part is named with the reason: no tower, or (this demo has a tiny one) an image that
    # cannot be fetched from a machine without a network
    with pytest.raises(
        openai.BadRequestError,
        match=r"content\[1\].*(no vision tower|cannot read images|could not fetch)",
    ):
        client(server).chat.completions.create(model="x", messages=body["messages"])


@pytest.mark.parametrize(
    "extra, name",
    [
        ({"echo": True}, "echo"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 2}, "logprobs"),
        ({"tools": []}, "tools"),
    ],
)
def test_completion_fields_not_honoured_are_refused(server, extra, name):
    status, err = error_of(raw(server, "/v1/completions", {"prompt": "Hi", **extra}))
    assert status == 400 and err["param"] == name


def test_honoured_fields_are_accepted(server):
    c = client(server)
    for kw in (dict(temperature=0), dict(temperature=0.7, top_p=1), dict(user="u1", seed=1)):
        r = c.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            extra_body={"steps": 2},
            **kw,
        )
        assert r.choices[0].finish_reason in ("stop", "length")


def test_max_tokens_exact_and_usage(server):
    c = client(server)
    for max_tokens in (1, 5, 33):
        r = c.completions.create(
            model="x",
            prompt="Once upon a time",
            max_tokens=max_tokens,
            seed=2,
            extra_body={"steps": 2},
        )
        n = r.usage.completion_tokens
        assert n <= max_tokens and (r.choices[0].finish_reason == "stop" or n == max_tokens)
    r = c.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=5,
        seed=2,
        extra_body={"steps": 2},
    )
    assert r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stop_strings(server):
    c = client(server)
    kw = dict(model="x", prompt="Once upon a time", max_tokens=32, seed=5, extra_body={"steps": 2})
    text = c.completions.create(**kw).choices[0].text
    stop = next(
        (text[i : i + 3] for i in range(3, len(text) - 3) if "\ufffd" not in text[i : i + 3]), None
    )
    if stop is None:
        pytest.skip("the demo's text is too short here")
    want = text[: text.find(stop)]
    r = c.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = c.completions.create(stop=stop, stream=True, **kw)
    streamed = "".join(ch.choices[0].text for ch in chunks)
    assert streamed == want


def test_n_choices_in_one_batch(server):
    c = client(server)
    kw = dict(model="x", prompt="Tell me", max_tokens=16, extra_body={"steps": 2})
    r = c.completions.create(n=3, seed=10, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.choices[2].text == c.completions.create(seed=12, **kw).choices[0].text
    chunks = list(c.completions.create(n=2, seed=10, stream=True, **kw))
    second = "".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == 1)
    assert second == r.choices[1].text


def test_thinking_goes_to_reasoning_content(server):
    r = client(server).chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Think first"}],
        max_tokens=32,
        seed=4,
        extra_body={"steps": 2, "chat_template_kwargs": {"enable_thinking": True}},
    )
    msg = r.choices[0].message
    assert "<|channel>" not in (msg.content or "") and "<channel|>" not in (msg.content or "")
    assert msg.model_extra.get("reasoning_content") or not msg.content


def test_prompt_cache_across_requests(server):
    c = client(server)
    kw = dict(model="x", max_tokens=8, seed=1, extra_body={"steps": 2})
    first = [{"role": "user", "content": "Hello there, a first question"}]
    r1 = c.chat.completions.create(messages=first, **kw)
    before = health(server)["prompt_tokens_encoded"]
    second = first + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "And a second one"},
    ]
    r2 = c.chat.completions.create(messages=second, **kw)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens
    assert health(server)["prompt_tokens_encoded"] - before == r2.usage.prompt_tokens - cached


def test_concurrent_requests_are_batched_and_equal_their_solo_runs(server):
    c = client(server)
    prompts = [f"Request number {i} asks something" for i in range(4)]
    kw = dict(model="x", max_tokens=64, extra_body={"steps": 3})
    solo = [
        c.completions.create(prompt=p, seed=20 + i, **kw).choices[0].text
        for i, p in enumerate(prompts)
    ]
    h0 = health(server)
    results = [None] * 4

    def go(i):
        r = client(server).completions.create(prompt=prompts[i], seed=20 + i, **kw)
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == solo
    h1 = health(server)
    rows = h1["canvas_rows"] - h0["canvas_rows"]
    assert rows > h1["canvases"] - h0["canvases"]  # they shared canvases


def raw_socket(port, data, wait=5.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=wait)
    s.sendall(data)
    reply = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    except socket.timeout:
        pass
    s.close()
    return reply.decode(errors="replace")


def test_hostile_bodies_get_json_errors(server):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    deep = b"[" * 100000 + b"]" * 100000
    status, err = error_of(raw(server, "/v1/chat/completions", deep))
    assert status == 400 and "nested" in err["message"]
    status, err = error_of(
        raw(
            server,
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
        )
    )
    assert status == 400 and "surrogate" in err["message"]
    reply = raw_socket(server, head + b"Content-Length: -5\r\n\r\n")
    assert reply.startswith("HTTP/1.1 400") and '"error"' in reply
    t = time.time()
    reply = raw_socket(server, head + b'Content-Length: 100\r\n\r\n{"messages":', wait=10)
    assert reply.startswith("HTTP/1.1 408") and '"error"' in reply and time.time() - t < 8
    t = time.time()
    assert raw_socket(server, b"POST /v1/chat/compl", wait=10) == "" and time.time() - t < 8
    assert health(server)["status"] == "ok"


def test_chunked_body_and_keep_alive(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    body = json.dumps({"prompt": "Hello", "max_tokens": 4, "steps": 2}).encode()
    conn.request(
        "POST",
        "/v1/completions",
        body=iter([body[:7], body[7:]]),
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["object"] == "text_completion"
    conn.request("GET", "/health")  # the same connection goes on in step
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_early_disconnects_are_quiet(server):
    body = json.dumps({"prompt": "x", "max_tokens": 64, "steps": 4}).encode()
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    for data in (head[:20], head, head + body[:5], head + body):
        s = socket.create_connection(("127.0.0.1", server), timeout=10)
        s.sendall(data)
        s.close()
    time.sleep(1.0)
    assert health(server)["status"] == "ok"


def test_queue_bound_answers_429(text_demo):
    proc, port = start_server("--model", str(text_demo), "--max-batch", "1", "--max-queue", "1")
    try:
        body = json.dumps(
            {
                "prompt": "long",
                "max_tokens": 32 * 40,
                "steps": 48,
                "stream": True,
                "stability_threshold": 1000,
            }
        ).encode()
        socks, statuses = [], []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            socks.append(s)
            time.sleep(0.3)
        for s in socks:
            statuses.append(s.recv(64).split(b" ")[1])
        assert b"429" in statuses and statuses[0] == b"200"
        for s in socks:
            s.close()
        deadline = time.time() + 30
        while time.time() < deadline:
            h = health(port)
            if h["in_flight"] == 0 and h["active_rows"] == 0:
                break
            time.sleep(0.2)
        assert h["requests"] == h["served"] + h["cancelled"] + h["rejected"] + h["failed"] == 4
        assert h["rejected"] >= 1 and h["cancelled"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_no_traceback_in_the_log(server):
    time.sleep(0.5)
    log = "".join(LOG)
    assert "Traceback" not in log, log[-3000:]
