"""The server's output parser on its own: fed a few characters at a time it sends, in pieces,
exactly what it gives for the whole text at once (markers and stop strings split across canvases
are held back until they are known), and usage counts the tokens behind the returned text."""

import pytest
from mlx_lm.tool_parsers import gemma4

from mlx_diffusiongemma.serving.output import ChoiceOutput


class CharTokenizer:
    """One token per character; Gemma 4's thinking and tool-call markers."""

    has_thinking, think_start, think_end = True, "<|channel>thought", "<channel|>"
    has_tool_calling = True
    tool_call_start, tool_call_end = gemma4.tool_call_start, gemma4.tool_call_end
    tool_parser = staticmethod(gemma4.parse_tool_call)

    def decode(self, ids):
        return "".join(map(chr, ids))


CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
TEXTS = [
    "<|channel>thought\nLet me think.<channel|>The answer." + CALL + " Done.",
    "plain text with no markers at all, and a STOP in it",
    "<|chan not a marker <channel| nor this, then " + CALL,
]


def run(text, piece, **kw):
    out = ChoiceOutput(CharTokenizer(), chat=True, tools=[{}], **kw)
    ids = [ord(c) for c in text]
    content = reasoning = ""
    calls = []
    for i in range(0, len(ids), piece):
        final = i + piece >= len(ids)
        d = out.feed(ids[i : i + piece], final)
        content, reasoning, calls = (
            content + d.content,
            reasoning + d.reasoning,
            calls + [(c["function"]["name"], c["function"]["arguments"]) for c in d.tool_calls],
        )
        if out.finished:
            break
    return content, reasoning, calls, out.returned_tokens


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stop", [[], ["STOP"], [". "]])
def test_pieces_add_up_to_the_whole(text, stop):
    whole = run(text, len(text) + 1, stop=stop)
    for piece in (1, 2, 3, 7, 16):
        assert run(text, piece, stop=stop) == whole, piece


def test_sections():
    content, reasoning, calls, n = run(TEXTS[0], 5)
    assert reasoning == "\nLet me think." and content == "The answer. Done."
    assert calls == [("get_weather", '{"city": "Paris"}')] and n == len(TEXTS[0])
    content, _, _, n = run(TEXTS[1], 4, stop=["STOP"])
    assert content == "plain text with no markers at all, and a " and n == len(content)
    content, reasoning, calls, _ = run(TEXTS[2], 3)
    assert content == "<|chan not a marker <channel| nor this, then " and len(calls) == 1
    _, reasoning, _, _ = run("still thinking", 4, thinking_open=True)
    assert reasoning == "still thinking"
