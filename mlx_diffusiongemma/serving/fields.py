"""What every part of a request's reading shares: the client-fault error, the checked request
(`Parsed`), and readers of typed fields that refuse a wrong type or range with a 400 naming the
field. requests.py (the body) and prompts.py (messages, prompts, tools) both build on this."""

from dataclasses import dataclass, field
from typing import Any, List, Optional

from ..sampler import SamplerSettings


class RequestError(Exception):
    """A client fault: answered with `status` and a JSON error naming `param`."""

    def __init__(
        self,
        message: str,
        param: Optional[str] = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        }


@dataclass
class Parsed:
    """A request, checked: what the scheduler and the output parser need."""

    chat: bool
    prompt: List[int]
    settings: SamplerSettings
    n: int = 1
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    drafts: bool = False
    tools: Optional[list] = None  # the request's tools (their calls are parsed from the output)
    parallel_tool_calls: bool = True
    thinking_open: bool = False  # the prompt leaves a thought channel open
    text_prompt: Optional[str] = None  # a completion's prompt as sent, when text
    suffix: Optional[str] = None  # /v1/completions infilling
    gap_length: Optional[int] = None
    pins: Optional[object] = None  # infilling: the suffix held in the canvas (denoise.Pins)
    gap: Optional[tuple] = None  # infilling: the gap's (start, length) in the canvas
    images: list = field(default_factory=list)  # image sources, for a model that reads them


# ---- field readers -------------------------------------------------------------------------
def int_field(body, key, lo, hi=None):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        top = hi if hi is not None else "∞"
        raise RequestError(f"'{key}' must be an integer in [{lo}, {top}]", key)
    return v


def num_field(body, key, lo=None, hi=None):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise RequestError(f"{key} must be a finite number, not {v!r}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RequestError(f"'{key}' must lie in [{lo}, {hi}]", key)
    return float(v)


def bool_field(body, key, default=False):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"'{key}' must be true or false", key)
    return v


def is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
