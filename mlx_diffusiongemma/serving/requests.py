"""What a request body means. Every OpenAI field is either honoured (its meaning for this
sampler is in the README's Server section) or refused with a 400 that names it; unknown fields
are refused too, so nothing a client sends is silently ignored."""

import json
from typing import List

from ..sampler import SamplerSettings
from ..utils import ceil_div
from .fields import Parsed, RequestError, bool_field, int_field, num_field
from .prompts import chat_prompt, completion_prompt

MAX_DEPTH = 64  # JSON nesting a request may have
MAX_STOP = 4  # stop strings, as OpenAI
MAX_N = 16
NEAR_GREEDY = dict(t_min=1e-4, t_max=2e-4)  # what temperature 0 becomes


# ---- body-level checks ---------------------------------------------------------------------
def decode_body(raw: bytes) -> dict:
    """JSON object from bytes, or a RequestError: bad UTF-8 or JSON, nesting past MAX_DEPTH
    (json itself gives up with RecursionError far deeper), lone surrogates in any string."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise RequestError(f"body is nested more than {MAX_DEPTH} levels deep") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"body is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(body, dict):
        raise RequestError("body must be a JSON object")
    _check_strings(body)
    return body


def _check_strings(body):
    """Walks the body without recursion: depth bound, and every string (keys too) valid UTF-8
    (JSON's \\ud800 escapes decode to lone surrogates the tokenizer cannot take)."""
    stack = [(body, 1, "")]
    while stack:
        obj, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise RequestError(f"body is nested more than {MAX_DEPTH} levels deep")
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            where = f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]"
            for s in (k, v):
                if isinstance(s, str):
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        raise RequestError(
                            f"'{where.lstrip('.')}' holds a lone surrogate (invalid Unicode)",
                            where.lstrip("."),
                        ) from None
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1, where))


def _refuse(key, why):
    raise RequestError(f"'{key}' is not supported: {why}", key)


# Fields with no effect on the output, accepted as OpenAI documents them (identifiers, storage
# hints for OpenAI's own service).
INFORMATIONAL = {
    "model",
    "user",
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
}
SAMPLER_EXTRAS = {
    "steps",
    "entropy_bound",
    "t_min",
    "t_max",
    "stability_threshold",
    "confidence_threshold",
}
COMMON = (
    INFORMATIONAL
    | SAMPLER_EXTRAS
    | {
        "max_tokens",
        "n",
        "stop",
        "stream",
        "stream_options",
        "seed",
        "temperature",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "drafts",
        "store",
    }
)
CHAT = COMMON | {
    "messages",
    "max_completion_tokens",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "enable_thinking",
    "chat_template_kwargs",
    "reasoning_effort",
    "modalities",
    "functions",
    "function_call",
    "audio",
    "prediction",
    "web_search_options",
    "verbosity",
}
COMPLETIONS = COMMON | {"prompt", "suffix", "gap_length", "echo", "best_of"}


def _check_unsupported(body, chat):
    """The fields this sampler cannot honour: refused unless at their neutral value."""
    neutral = {"top_p": 1, "frequency_penalty": 0, "presence_penalty": 0}
    for k, v in neutral.items():
        if body.get(k) is not None and num_field(body, k) != v:
            _refuse(
                k,
                f"the entropy-bound sampler draws from the whole tempered distribution "
                f"(only {v} is accepted)",
            )
    if body.get("logit_bias"):
        _refuse("logit_bias", "logits are not biased by this sampler")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        key = "logprobs" if body.get("logprobs") not in (None, False) else "top_logprobs"
        _refuse(key, "tokens are committed a canvas at a time, not drawn one by one")
    if body.get("store") not in (None, False):
        _refuse("store", "this server keeps no completions")
    if chat:
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            _refuse("response_format", "no constrained decoding (only {'type': 'text'})")
        if body.get("modalities") not in (None, ["text"]):
            _refuse("modalities", "text output only")
        for k in ("functions", "function_call"):
            if body.get(k) is not None:
                _refuse(k, "the legacy function API; send 'tools'")
        for k in ("audio", "prediction", "web_search_options", "verbosity"):
            if body.get(k) is not None:
                _refuse(k, "not available with this model")
    else:
        if body.get("echo") not in (None, False):
            _refuse("echo", "the prompt is not echoed")
        if body.get("best_of") not in (None, 1):
            _refuse("best_of", "choices are not ranked (use 'n')")


def _stop(body) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError(
            f"'stop' must be a non-empty string or a list of at most {MAX_STOP}", "stop"
        )
    return stop


def _stream_options(body, stream) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    if not stream:
        raise RequestError("'stream_options' is only allowed with 'stream': true", "stream_options")
    unknown = set(opts) - {"include_usage"}
    if unknown:
        _refuse(f"stream_options.{sorted(unknown)[0]}", "only include_usage is known")
    return bool_field(opts, "include_usage")


def sampler_settings(body, generation_config, max_tokens_limit) -> SamplerSettings:
    """The sampler's settings: the extra fields first, then `temperature` as a factor on the
    checkpoint's t_min..t_max schedule (0: near greedy)."""
    max_tokens = int_field(body, "max_completion_tokens", 1, max_tokens_limit)
    if max_tokens is None:
        max_tokens = int_field(body, "max_tokens", 1, max_tokens_limit)
    try:
        settings = SamplerSettings.resolve(
            generation_config,
            max_tokens=max_tokens,
            max_denoising_steps=int_field(body, "steps", 1, 1000),
            entropy_bound=num_field(body, "entropy_bound"),
            t_min=num_field(body, "t_min"),
            t_max=num_field(body, "t_max"),
            stability_threshold=int_field(body, "stability_threshold", 0),
            confidence_threshold=num_field(body, "confidence_threshold"),
        )
        temp = num_field(body, "temperature", 0, 2)
        if temp is not None and body.get("t_min") is None and body.get("t_max") is None:
            if temp == 0:
                settings.t_min, settings.t_max = NEAR_GREEDY["t_min"], NEAR_GREEDY["t_max"]
            else:
                settings.t_min, settings.t_max = settings.t_min * temp, settings.t_max * temp
        settings.validate()
    except ValueError as e:
        raise RequestError(str(e)) from None
    if settings.max_tokens > max_tokens_limit:
        raise RequestError(f"'max_tokens' must be at most {max_tokens_limit}", "max_tokens")
    return settings


def parse(body: dict, chat: bool, model, tokenizer, max_tokens_limit: int) -> Parsed:
    """Checks `body` (already a dict from decode_body) for /v1/chat/completions (`chat`) or
    /v1/completions and builds the prompt's tokens."""
    allowed = CHAT if chat else COMPLETIONS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field '{unknown[0]}'", unknown[0])
    _check_unsupported(body, chat)
    stream = bool_field(body, "stream")
    p = Parsed(
        chat=chat,
        prompt=[],
        settings=sampler_settings(body, model.generation_config, max_tokens_limit),
    )
    p.n = int_field(body, "n", 1, MAX_N) or 1
    p.seed = int_field(body, "seed", 0, 2**63 - 1)
    p.stop, p.stream = _stop(body), stream
    p.include_usage = _stream_options(body, stream)
    p.drafts = bool_field(body, "drafts")
    if chat:
        chat_prompt(body, p, model, tokenizer)
    else:
        completion_prompt(body, p, tokenizer, model)
    _check_ids(p.prompt, model)
    _check_context(p, model)
    return p


def _check_ids(ids: List[int], model):
    V = model.args.vocab_size
    if not ids:
        raise RequestError("the prompt is empty", "prompt")
    if min(ids) < 0 or max(ids) >= V:
        raise RequestError(f"prompt token ids must lie in [0, {V})", "prompt")


def _check_context(p: Parsed, model):
    args = model.args
    C = args.canvas_length
    total = len(p.prompt) + ceil_div(p.settings.max_tokens, C) * C
    if total > args.max_position_embeddings:
        raise RequestError(
            f"prompt ({len(p.prompt)} tokens) plus {total - len(p.prompt)} "
            "generated tokens exceeds the model's context of "
            f"{args.max_position_embeddings}",
            "max_tokens",
        )
