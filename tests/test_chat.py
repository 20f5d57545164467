"""Chat sessions: the prompt cache is kept across turns and each turn encodes only new tokens."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx

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
    reply = sum((r.tokens for r in r1), []) + ([r1[-1].stop_token] if r1[-1].stop_token is not None else [])
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
    r = subprocess.run([sys.executable, "-m", "mlx_diffusiongemma.chat", "--model", str(text_demo),
                        "--steps", "3", "--seed", "0"],
                       cwd=ROOT, input="hi\nr\nhow are you\nq\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(">> ") == 4
