"""Prompts from request bodies: messages (with tools, tool results, thinking and image parts)
through the chat template, or a completion's text or token ids."""

import json

from .fields import Parsed, RequestError, bool_field, int_field, is_int_list

ROLES = {"system", "developer", "user", "assistant", "tool"}
MESSAGE_KEYS = {
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "reasoning_content",
    "refusal",
}
IMAGE_PARTS = {"image_url", "input_image", "image"}
# Names apply_chat_template sets itself: a client's chat_template_kwargs may not replace them.
RESERVED_KWARGS = {
    "conversation",
    "messages",
    "tools",
    "documents",
    "chat_template",
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "return_dict",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
}
EFFORTS = {"none", "minimal", "low", "medium", "high"}


def _content(content, where, marker, images, why=None):
    """Message content as text for the template. Image parts are read here (a bad one is the
    request's fault) and stand in the text as `marker`, the placeholder the model's prompt
    layout expands into the image's block; `marker` is None where the model reads no images."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"'{where}' must be a string, null or a list of parts", where)
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"'{at}.text' must be a string", f"{at}.text")
            texts.append(part["text"])
        elif kind in IMAGE_PARTS:
            if marker is None:
                raise RequestError(
                    f"'{at}' is an image, and "
                    f"{why or 'this checkpoint has no vision tower to read it'} "
                    "(send text parts only)",
                    at,
                )
            src = part.get(kind) if kind != "image" else part.get("image", part.get("url"))
            src = src.get("url") if isinstance(src, dict) else src
            if not isinstance(src, str):
                raise RequestError(f"'{at}' needs an image URL or data URL", at)
            from ..image_processor import load_image

            try:
                images.append(load_image(src))
            except ValueError as e:
                raise RequestError(f"'{at}': {e}", at) from None
            texts.append(marker)
        else:
            raise RequestError(f"'{at}' must be an object with 'type' 'text' (or an image)", at)
    return "".join(texts)


def _tool_calls(calls, where):
    """OpenAI tool calls (arguments as JSON text) as templates take them (arguments a dict)."""
    if not isinstance(calls, list):
        raise RequestError(f"'{where}' must be a list", where)
    out = []
    for j, c in enumerate(calls):
        at = f"{where}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError(f"'{at}' needs a 'function' with a 'name'", at)
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except (json.JSONDecodeError, RecursionError):
                raise RequestError(
                    f"'{at}.function.arguments' is not valid JSON", f"{at}.function.arguments"
                ) from None
        if not isinstance(args, dict):
            raise RequestError(
                f"'{at}.function.arguments' must be a JSON object", f"{at}.function.arguments"
            )
        out.append(
            {
                "id": c.get("id"),
                "type": "function",
                "function": {"name": fn["name"], "arguments": args},
            }
        )
    return out


def _messages(body, marker, images, why=None):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    names, clean = {}, []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"'{where}' needs a 'role', one of {sorted(ROLES)}", f"{where}.role")
        unknown = sorted(set(m) - MESSAGE_KEYS)
        if unknown:
            raise RequestError(f"unknown field '{where}.{unknown[0]}'", f"{where}.{unknown[0]}")
        if "content" not in m and not m.get("tool_calls"):
            raise RequestError(f"'{where}' needs a 'content'", f"{where}.content")
        msg = {
            "role": "system" if m["role"] == "developer" else m["role"],
            "content": _content(m.get("content"), f"{where}.content", marker, images, why),
        }
        if msg["content"] is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise RequestError(f"'{where}.content' must be text", f"{where}.content")
        for k in ("name", "tool_call_id", "reasoning_content"):
            if m.get(k) is not None:
                if not isinstance(m[k], str):
                    raise RequestError(f"'{where}.{k}' must be a string", f"{where}.{k}")
                msg[k] = m[k]
        if m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
            names.update({c["id"]: c["function"]["name"] for c in msg["tool_calls"] if c["id"]})
        if msg["role"] == "tool" and "name" not in msg and msg.get("tool_call_id") in names:
            msg["name"] = names[msg["tool_call_id"]]  # templates render the tool's name
        clean.append(msg)
    return clean


def _tools(body, tokenizer):
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise RequestError(
            "'tool_choice' is not supported: calls cannot be forced (only 'auto' or 'none')",
            "tool_choice",
        )
    if not tools or choice == "none":
        return None
    if not getattr(tokenizer, "has_tool_calling", False):
        raise RequestError("'tools': this model's chat template has no tool-call format", "tools")
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list", "tools")
    for j, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if (
            (t.get("type") if isinstance(t, dict) else None) != "function"
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
        ):
            raise RequestError(
                f"'tools[{j}]' must be {{'type': 'function', 'function': "
                "{'name': ..., 'parameters': {...}}}",
                f"tools[{j}]",
            )
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise RequestError(
                f"'tools[{j}].function.parameters' must be an object",
                f"tools[{j}].function.parameters",
            )
    return tools


def _template_kwargs(body):
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    reserved = sorted(set(kwargs) & RESERVED_KWARGS)
    if reserved:
        raise RequestError(
            f"'chat_template_kwargs.{reserved[0]}' is set by the server",
            f"chat_template_kwargs.{reserved[0]}",
        )
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise RequestError(
            f"'reasoning_effort' must be one of {sorted(EFFORTS)}", "reasoning_effort"
        )
    thinking = bool_field(body, "enable_thinking", None)
    if thinking is None and effort is not None:
        thinking = effort not in ("none", "minimal")
    return {"enable_thinking": bool(thinking), **kwargs}


def chat_prompt(body, p: Parsed, model, tokenizer):
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template; use /v1/completions", "messages")
    marker, why = None, "this checkpoint has no vision tower to read it"
    if getattr(model, "has_vision", False):
        from ..multimodal import placeholders

        args = model.args
        if max(args.image_token_id, args.boi_token_id, args.eoi_token_id) >= args.vocab_size:
            why = "this checkpoint cannot read images (its image tokens lie outside its vocabulary)"
        else:
            marker = placeholders(model, tokenizer, 1)
    messages = _messages(body, marker, p.images, why)
    p.tools = _tools(body, tokenizer)
    p.parallel_tool_calls = bool_field(body, "parallel_tool_calls", True)
    kwargs = _template_kwargs(body)
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=p.tools, tokenize=False, add_generation_prompt=True, **kwargs
        )
    except Exception as e:  # the template's own raise_exception, or a type it cannot render
        raise RequestError(
            f"the chat template cannot render these messages: {e}", "messages"
        ) from None
    if p.images:
        from ..multimodal import expand_text

        try:
            p.prompt = expand_text(model, tokenizer, text, p.images)
        except ValueError as e:
            raise RequestError(
                f"the images cannot be placed in this prompt: {e}", "messages"
            ) from None
    else:
        p.prompt = list(tokenizer.encode(text, add_special_tokens=False))
    if getattr(tokenizer, "has_thinking", False):
        p.thinking_open = text.rfind(tokenizer.think_start) > text.rfind(tokenizer.think_end)


def completion_prompt(body, p: Parsed, tokenizer, model):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RequestError("the prompt is empty", "prompt")
        if tokenizer is None:
            raise RequestError("this model has no tokenizer: send token ids", "prompt")
        p.prompt, p.text_prompt = list(tokenizer.encode(prompt)), prompt
    elif is_int_list(prompt):
        p.prompt = list(prompt)
    else:
        raise RequestError(
            "'prompt' must be a string or a list of token ids (one prompt; use "
            "'n' for several choices)",
            "prompt",
        )
    suffix = body.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str) or not isinstance(prompt, str):
            raise RequestError("'suffix' needs a text prompt and a text suffix", "suffix")
        if p.n != 1 or p.stop:
            raise RequestError("'suffix' (infilling) takes neither 'n' nor 'stop'", "suffix")
        p.suffix, p.gap_length = suffix, int_field(body, "gap_length", 1)
        _infill_canvas(p, tokenizer, model)


def _infill_canvas(p: Parsed, tokenizer, model):
    """An infilling request as one row of the batch: its prefix is the prompt, the suffix is
    pinned in the canvas, and one canvas fills the gap (as `infilling.infill`)."""
    from dataclasses import replace

    from ..infilling import Gap, canvas_pins, layout

    C = model.args.canvas_length
    try:
        prefix, plan = layout([p.text_prompt, Gap(p.gap_length), p.suffix], tokenizer, C)
    except ValueError as e:  # the gap and the suffix do not fit a canvas
        raise RequestError(str(e), "suffix") from None
    p.prompt = prefix
    p.pins, (p.gap,) = canvas_pins(plan, C)
    p.settings = replace(p.settings, max_tokens=C)
