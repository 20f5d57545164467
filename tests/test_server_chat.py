"""Tool calls, thinking and stop strings through the `openai` client, on a server run in this
process over a tiny checkpoint with a Gemma 4 style tokenizer (tests/make_chat_checkpoint.py).
A random model does not write tool calls, so the denoiser is replaced by one that commits a
scripted text canvas by canvas: everything after it (cut at EOS, decoding with the special
tokens kept, parsing, streaming, usage) is the server's own."""

import socket
import threading
import time

import mlx.core as mx
import pytest

openai = pytest.importorskip("openai")

from make_chat_checkpoint import EOS, write_chat_checkpoint  # noqa: E402

from mlx_diffusiongemma import generator as generator_module  # noqa: E402
from mlx_diffusiongemma.loader import load  # noqa: E402

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'


class Script:
    """Stands in for denoise_canvas: each canvas of each row is the next piece of `text`."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.pos = tokenizer, [], {}

    def set(self, text):
        self.ids, self.pos = self.tokenizer.encode(text, add_special_tokens=False) + [EOS[1]], {}

    def __call__(self, model, caches, canvas, settings, keys, on_step=None, pins=None):
        C = canvas.shape[1]
        rows = []
        for cache in caches if isinstance(caches, list) else [caches]:
            start = self.pos.get(id(cache), 0)
            piece = (self.ids[start : start + C] + [EOS[1]] * C)[:C]
            self.pos[id(cache)] = start + C
            rows.append(piece)
        if on_step is not None:
            on_step(
                1,
                mx.array(rows),
                mx.ones((len(rows), C), dtype=mx.bool_),
                mx.zeros((len(rows), C)),
                list(range(len(rows))),
            )
        return mx.array(rows, dtype=mx.int32), 1


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from mlx_diffusiongemma.server import build_state, make_server

    model, tokenizer = load(write_chat_checkpoint(tmp_path_factory.mktemp("chat")))
    script = Script(tokenizer)
    patch = pytest.MonkeyPatch()
    patch.setattr(generator_module, "denoise_canvas", script)
    # the cache id is the row's identity for the script: a row's cache object stays the same
    state = build_state(model, tokenizer, "chat-test", prompt_cache_size=0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = make_server(state, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    port = sock.getsockname()[1]
    yield (
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0),
        script,
        model,
        tokenizer,
    )
    server.should_exit = True
    thread.join(10)
    state.scheduler.stop()
    patch.undo()


def ask(client, stream=False, **kw):
    body = dict(model="x", messages=[{"role": "user", "content": "Weather in Paris?"}], **kw)
    if not stream:
        return client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(stream=True, **body))
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
        for c in chunks
        if c.choices
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    return reasoning, content, calls, finish


def test_tool_call_and_thinking_not_streamed(served):
    client, script, _, _ = served
    script.set("I should check the weather.<channel|>Sure." + CALL)
    r = ask(client, tools=TOOLS, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == "I should check the weather."
    assert msg.content == "Sure." and r.choices[0].finish_reason == "tool_calls"
    (call,) = msg.tool_calls
    assert call.function.name == "get_weather" and call.type == "function" and call.id
    assert call.function.arguments == '{"city": "Paris"}'


def test_tool_call_and_thinking_streamed(served):
    client, script, _, _ = served
    script.set("<|channel>thought\nHmm, a tool.<channel|>Sure." + CALL + CALL)
    reasoning, content, calls, finish = ask(client, stream=True, tools=TOOLS)
    assert reasoning == "\nHmm, a tool." and content == "Sure." and finish == ["tool_calls"]
    assert [c.index for c in calls] == [0, 1] and calls[0].function.name == "get_weather"
    # parallel_tool_calls false: the first call ends the choice
    script.set("Sure." + CALL + CALL)
    _, _, calls, _ = ask(client, stream=True, tools=TOOLS, parallel_tool_calls=False)
    assert len(calls) == 1


def test_thinking_never_reaches_content(served):
    client, script, _, _ = served
    script.set("still thinking, cut by the length")
    r = ask(client, max_tokens=4, extra_body={"enable_thinking": True})
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.model_extra["reasoning_content"]
    assert r.usage.completion_tokens == 4


def test_stop_strings_cut_streamed_and_not(served):
    client, script, _, tokenizer = served
    text = "The answer is 42. Then more text follows"
    script.set(text)
    r = ask(client, stop=["Then", "nothing"])
    assert r.choices[0].message.content == "The answer is 42. "
    assert r.choices[0].finish_reason == "stop"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert r.usage.completion_tokens < len(ids)
    script.set(text)
    _, content, _, finish = ask(client, stream=True, stop="Then")
    assert content == "The answer is 42. " and finish == ["stop"]


def test_max_tokens_exact_and_usage(served):
    client, script, _, tokenizer = served
    script.set("one two three four five six seven eight nine ten eleven twelve")
    for max_tokens in (1, 3, 16, 17):
        r = ask(client, max_tokens=max_tokens)
        assert r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length"
        script.pos = {}


def test_unclosed_tool_call_is_kept_as_text(served):
    client, script, _, _ = served
    script.set("Sure." + CALL)
    r = ask(client, tools=TOOLS, max_tokens=8)
    assert r.choices[0].message.content.startswith("Sure.<|tool_call>call:")
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_tool_history_renders_through_the_template(served):
    from mlx_diffusiongemma.serving.requests import parse

    _, _, model, tokenizer = served
    body = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        "tools": TOOLS,
    }
    text = tokenizer.decode(parse(body, True, model, tokenizer, 1000).prompt)
    assert '<|tool>declaration:get_weather{"type": "object"' in text
    assert '<|tool_call>call:get_weather{"city": "Paris"}<tool_call|>' in text
    assert "<|tool_response>response:get_weather" in text and "sunny<tool_response|>" in text
