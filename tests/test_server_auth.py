"""The server's API key: /v1/... answers 401 JSON without the right Bearer key, /health stays
open; a host other machines can reach is refused without --api-key or --no-api-key."""

import argparse
import http.client
import json
import os
import subprocess
import sys

import pytest
from test_server import ROOT, client, start_server

from mlx_diffusiongemma.server import API_KEY_ENV, api_key_setting, loopback

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(text_demo):
    proc, port = start_server("--model", str(text_demo), "--api-key", KEY)
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def request(port, method, path, headers=None, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = None if body is None else json.dumps(body).encode()
    c.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    return r.status, json.loads(r.read()), r.getheader("WWW-Authenticate")


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 0}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
    ],
)
def test_requests_without_the_key_get_401(server, headers):
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/nothing-here", {}),
    ):
        status, got, challenge = request(server, method, path, headers, body)
        assert status == 401 and challenge == "Bearer"
        assert got["error"]["code"] == 401 and got["error"]["type"] == "invalid_request_error"
        assert "API key" in got["error"]["message"]


def test_the_key_opens_the_api_and_health_is_open(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert request(server, "GET", "/v1/models", auth)[0] == 200
    assert request(server, "GET", "/v1/models", {"authorization": f"bearer {KEY}"})[0] == 200
    status, got, _ = request(server, "POST", "/v1/chat/completions", auth, CHAT)
    assert status == 200 and got["choices"][0]["message"]["content"] is not None
    assert request(server, "GET", "/health")[0] == 200
    assert request(server, "GET", "/v1/nothing-here", auth)[0] == 404
    reply = (
        client(server)
        .with_options(api_key=KEY)
        .completions.create(model="x", prompt="a", max_tokens=4)
    )
    assert reply.choices[0].text is not None


def settings(*argv):
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--api-key")
    p.add_argument("--no-api-key", action="store_true")
    return p.parse_args(argv)


def test_api_key_setting():
    assert all(map(loopback, ("127.0.0.1", "localhost", "::1", "127.0.0.2")))
    assert not any(map(loopback, ("0.0.0.0", "::", "192.168.1.5", "mac-studio.local")))
    assert api_key_setting(settings(), {}) is None
    assert api_key_setting(settings(), {API_KEY_ENV: "k"}) == "k"
    assert (
        api_key_setting(settings("--host", "0.0.0.0", "--api-key", "a"), {API_KEY_ENV: "k"}) == "a"
    )
    assert api_key_setting(settings("--host", "0.0.0.0"), {API_KEY_ENV: "k"}) == "k"
    assert (
        api_key_setting(settings("--host", "0.0.0.0", "--no-api-key"), {API_KEY_ENV: "k"}) is None
    )
    for argv in (("--host", "0.0.0.0"), ("--api-key", "a", "--no-api-key"), ("--api-key", " ")):
        with pytest.raises(ValueError):
            api_key_setting(settings(*argv), {})


def test_reachable_host_without_a_key_is_refused_with_one_line():
    cmd = [sys.executable, "-m", "mlx_diffusiongemma.server", "--host", "0.0.0.0", "--port", "0"]
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --host 0.0.0.0 can be reached"), lines
