"""Chat sessions: the prompt cache is kept across turns and each turn encodes only new tokens."""

import subprocess
import sys
from pathlib import Path

from mlx_diffusiongemma import load, load_model, make_prompt_cache, stream_generate
from mlx_diffusiongemma.chat import ChatSession

ROOT = Path(__file__).resolve().parent.parent


def spy_encode(model, monkeypatch):
    counts = []
    orig = type(model).encode

    def encode(self, ids, cache, *a, **k):
        counts.append(ids.shape[1])
        return orig(self, ids, cache, *a, **k)

    monkeypatch.setattr(type(model), "encode", encode)
    return counts


def test_second_turn_encodes_only_new_tokens_and_matches_fresh_run(tiny, monkeypatch):
    model = load_model(tiny[0])
    kw = dict(max_tokens=32, max_denoising_steps=5, eos_token_ids=[3, 17])
    turn1, turn2 = [5, 6, 7, 8, 9], [40, 41, 42]
    cache = make_prompt_cache(model)
    r1 = list(stream_generate(model, None, turn1, prompt_cache=cache, seed=0, **kw))
    reply = sum((r.tokens for r in r1), []) + (
        [r1[-1].stop_token] if r1[-1].stop_token is not None else []
    )
    conversation = turn1 + reply
    assert cache.offset == len(conversation)

    counts = spy_encode(model, monkeypatch)
    second = list(stream_generate(model, None, turn2, prompt_cache=cache, seed=11, **kw))
    assert counts[0] == len(turn2)  # the prompt pass of turn 2: its own tokens, nothing more
    counts.clear()
    fresh = list(stream_generate(model, None, conversation + turn2, seed=11, **kw))
    assert counts[0] == len(conversation + turn2)
    assert [r.tokens for r in second] == [r.tokens for r in fresh]


def test_chat_session_counts_tokens(monkeypatch, text_demo):
    model, tok = load(text_demo)
    s = ChatSession(model, tok, system_prompt="Be brief.")
    list(s.send("Hello there", seed=0, max_denoising_steps=3))
    assert s.cache.offset == len(s.history)
    new = s.new_tokens("And again?")
    assert tok.decode(s.history + new).endswith("<|turn>user\nAnd again?<turn|>\n<|turn>model\n")
    counts = spy_encode(model, monkeypatch)
    list(s.send("And again?", seed=0, max_denoising_steps=3))
    assert counts[0] == len(new)


def test_chat_repl_runs_turns(text_demo):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_diffusiongemma.chat",
            "--model",
            str(text_demo),
            "--steps",
            "3",
            "--seed",
            "0",
        ],
        cwd=ROOT,
        input="hi\nr\nhow are you\nq\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(">> ") == 4


def test_stopped_reply_keeps_the_conversation(text_demo):
    """A reply stopped half-way (Ctrl-C) leaves the cache as before the turn and the turn in the
    conversation with what was sent of the reply; the next turn encodes it from its text and
    the session's invariant (the cache holds exactly `history`) still holds."""
    model, tok = load(text_demo)
    s = ChatSession(model, tok)
    list(s.send("Hello there", seed=0, max_denoising_steps=2))
    before = (s.cache.offset, list(s.history), list(s.messages))

    C = model.args.canvas_length
    replies = s.send(
        "Tell me more", seed=1, max_denoising_steps=2, max_tokens=8 * C, eos_token_ids=[]
    )
    first = next(replies)
    replies.close()  # what the REPL does on Ctrl-C
    assert (s.cache.offset, s.history) == before[:2] and s.cache.offset == len(s.history)
    assert s.messages == before[2] + [
        {"role": "user", "content": "Tell me more"},
        {"role": "assistant", "content": first.text},
    ]

    def stop(draft):
        raise KeyboardInterrupt

    try:  # stopped inside the model, before any text: the turn is dropped
        list(s.send("Never mind", seed=2, max_denoising_steps=2, draft_callback=stop))
    except KeyboardInterrupt:
        pass
    assert s.cache.offset == len(s.history) and len(s.messages) == len(before[2]) + 2

    text = tok.decode(s.history + s.new_tokens("Go on"))
    assert "Tell me more" in text and "Never mind" not in text and "Go on" in text
    list(s.send("Go on", seed=3, max_denoising_steps=2))
    assert s.cache.offset == len(s.history)


def test_repl_ctrl_c_stops_a_reply_and_ctrl_d_quits(monkeypatch, capsys, text_demo):
    """The REPL: Ctrl-C while typing drops the line, Ctrl-C during a reply stops it and the
    chat goes on, Ctrl-D ends it with a newline and status 0."""
    import os
    import signal

    from mlx_diffusiongemma import chat, generation

    # as from a terminal: a suite started in the background (`&`) runs with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    lines = iter([KeyboardInterrupt, "hi", "again", EOFError])

    def fake_input(prompt):
        print(prompt, end="")
        item = next(lines)
        if isinstance(item, type):
            raise item()
        return item

    real, calls = generation.stream_generate, []

    def interrupted_second_turn(*a, **kw):
        calls.append(1)
        for r in real(*a, **kw):
            yield r
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, through the CLI's handler

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(generation, "stream_generate", interrupted_second_turn)
    rc = chat.main(
        ["--model", str(text_demo), "--steps", "2", "--seed", "0", "--max-tokens", "256"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and len(calls) == 2
    assert "[reply stopped]" in out and out.endswith(">> \n")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, previous)
