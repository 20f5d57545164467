"""One choice's output: tokens in, text deltas out. Stop strings cut the text; in chat the thought
channel goes to `reasoning` and tool-call sections are parsed with mlx-lm's parser for the
tokenizer's format (Gemma 4: `<|tool_call>call:name{...}<tool_call|>`). Text is decoded with
special tokens kept, since these markers are special tokens.

While more may come, text that could still turn into a marker or a stop string is held back,
so what was sent never has to be taken back."""

import json
import uuid
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: List[dict] = field(default_factory=list)  # OpenAI's form, arguments as JSON text

    def __bool__(self):
        return bool(self.content or self.reasoning or self.tool_calls)


def _held(text: str, markers) -> int:
    """Length of the longest end of `text` that is a proper start of some marker."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class ChoiceOutput:
    def __init__(
        self,
        tokenizer,
        stop=(),
        chat=False,
        thinking_open=False,
        tools=None,
        parallel_tool_calls=True,
    ):
        self.tokenizer, self.stop, self.tools = tokenizer, list(stop), tools
        self.parallel = parallel_tool_calls
        think = chat and getattr(tokenizer, "has_thinking", False)
        self.think = (tokenizer.think_start, tokenizer.think_end) if think else None
        parse_tools = chat and tools and getattr(tokenizer, "has_tool_calling", False)
        self.tool = (tokenizer.tool_call_start, tokenizer.tool_call_end) if parse_tools else None
        self.start_state = "reasoning" if (self.think and thinking_open) else "content"
        self.tokens: List[int] = []
        self.sent = Delta()  # everything sent so far
        self.n_content = self.n_reasoning = self.n_calls = 0  # section lengths already sent
        self.finished = False
        self.returned_tokens = 0  # tokens behind the text returned (usage)

    # ---- text ----------------------------------------------------------------------------
    def _decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else ""

    def _stop_at(self, text: str) -> Optional[int]:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _tokens_for(self, n_chars: int) -> int:
        """Fewest tokens whose text covers the first n_chars characters."""
        lo, hi = 0, len(self.tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._decode(self.tokens[:mid])) >= n_chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _sections(self, text: str, final: bool):
        """(reasoning, content, raw tool-call texts, position parsed up to)."""
        reasoning, content, calls = [], [], []
        state, pos = self.start_state, 0
        while pos < len(text):
            if state == "content":
                starts = [
                    (text.find(m, pos), m, s)
                    for m, s in (
                        (self.think and self.think[0], "reasoning"),
                        (self.tool and self.tool[0], "tool"),
                    )
                    if m
                ]
                starts = [x for x in starts if x[0] >= 0]
                if not starts:
                    end = (
                        len(text)
                        if final
                        else len(text)
                        - _held(
                            text[pos:],
                            [
                                m
                                for m in (self.think and self.think[0], self.tool and self.tool[0])
                                if m
                            ],
                        )
                    )
                    content.append(text[pos:end])
                    pos = end
                    break
                i, m, state = min(starts)
                content.append(text[pos:i])
                pos = i + len(m)
            elif state == "reasoning":
                j = text.find(self.think[1], pos)
                if j < 0:
                    end = len(text) if final else len(text) - _held(text[pos:], [self.think[1]])
                    reasoning.append(text[pos:end])
                    pos = end
                    break
                reasoning.append(text[pos:j])
                pos, state = j + len(self.think[1]), "content"
            else:  # inside a tool call
                j = text.find(self.tool[1], pos)
                if j < 0:
                    if final:  # never closed (cut for length): its text is kept as content
                        content.append(self.tool[0] + text[pos:])
                        pos = len(text)
                    break
                calls.append(text[pos:j])
                pos, state = j + len(self.tool[1]), "content"
                if not self.parallel:
                    break
        return "".join(reasoning), "".join(content), calls, pos

    def _call(self, raw: str):
        """OpenAI tool calls from one call section, or None when it does not parse."""
        try:
            parsed = self.tokenizer.tool_parser(raw, self.tools)
        except (ValueError, json.JSONDecodeError, KeyError, TypeError):
            return None
        out = []
        for tc in parsed if isinstance(parsed, list) else [parsed]:
            out.append(
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {
                        "name": tc["name"],
                        "arguments": json.dumps(tc["arguments"], ensure_ascii=False),
                    },
                }
            )
        return out

    # ---- feeding -------------------------------------------------------------------------
    def feed(self, tokens: List[int], final: bool) -> Delta:
        """Adds a canvas's tokens; returns what is new. Sets `finished` once a stop string (or,
        with parallel_tool_calls false, the first tool call) ends the choice."""
        self.tokens += tokens
        text = self._decode(self.tokens)
        cut = self._stop_at(text)
        if cut is not None:
            text, final, self.finished = text[:cut], True, True
        elif not final:
            held = _held(text, self.stop)
            text = text[: len(text) - held]
            while text.endswith("\ufffd"):  # a character split across canvases
                text = text[:-1]
        reasoning, content, calls, parsed_to = self._sections(text, final)
        if self.tool and not self.parallel and calls:
            calls, self.finished, final = calls[:1], True, True
            text = text[:parsed_to]
        if final:
            n = len(self.tokens)
            self.returned_tokens = self._tokens_for(len(text)) if self.finished else n
        delta = Delta(content[self.n_content :], reasoning[self.n_reasoning :])
        self.n_content, self.n_reasoning = len(content), len(reasoning)
        for raw in calls[self.n_calls :]:
            parsed = self._call(raw)
            if parsed is None:  # kept as text rather than lost
                delta.content += self.tool[0] + raw + self.tool[1]
            else:
                delta.tool_calls += parsed
        self.n_calls = len(calls)
        self.sent.content += delta.content
        self.sent.reasoning += delta.reasoning
        self.sent.tool_calls += delta.tool_calls
        return delta
