"""Training data: mlx-lm's jsonl formats (detected by their keys as mlx-lm does), split into
what the encoder reads and the canvases.

`{"messages": [...]}` (with `"tools"`) and `{"prompt", "completion"}` lines go through the chat
template: everything before the last assistant turn, with the generation prompt, is the prompt
(exactly what `generate` sends for it), the assistant turn with its end-of-turn token is the
response. A `{"text"}` line has no prompt of its own: the encoder reads
the BOS token alone (the text's first token for a tokenizer without one) and the whole text, with
an EOS after it, is the response.
"""

import json
from pathlib import Path
from typing import List, Tuple

from ..utils import ceil_div

Example = Tuple[List[int], List[int]]  # (prompt ids, response ids)


class DataError(ValueError):
    pass


def read_jsonl(path: Path) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            rows.append(row)
    return rows


def _format(row) -> str:
    if "prompt" in row and "completion" in row:
        return "completions"
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "text"
    return "unknown"


def render(tokenizer, row: dict, kind: str) -> Example:
    """(prompt ids, response ids) of one line. The prompt is rendered as `generate` renders one
    (generation prompt, thinking off); mlx-lm's datasets would turn thinking on for a tokenizer
    that has it, and so split off a prompt that inference never sends."""
    if kind == "text":
        tokens = list(tokenizer.encode(row["text"]))
        bos = tokenizer.bos_token_id
        if bos is not None and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        if tokens and tokens[-1] != tokenizer.eos_token_id:
            tokens.append(tokenizer.eos_token_id)
        return tokens[:1], tokens[1:]
    if kind == "completions":
        messages = [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
    else:
        messages = row["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not isinstance(messages[-1], dict)
            or messages[-1].get("role") != "assistant"
        ):
            raise ValueError("'messages' must end with an assistant message")
    kw = dict(tools=row.get("tools"), enable_thinking=False)
    full = list(tokenizer.apply_chat_template(messages, **kw))
    prompt = list(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, **kw))
    if full[: len(prompt)] != prompt:
        raise ValueError(
            "the chat template does not render the prompt as a prefix of the whole conversation"
        )
    return prompt, full[len(prompt) :]


def tokenize(path: Path, tokenizer, canvas_length: int, max_seq_length: int) -> List[Example]:
    """Every line of one jsonl file as (prompt ids, response ids); errors name file and line."""
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path} holds no examples")
    kind = _format(rows[0])
    if kind == "unknown":
        raise DataError(
            f"{path}:1: expected {{'messages'}}, {{'prompt', 'completion'}} or {{'text'}} keys"
        )
    examples = []
    for n, row in enumerate(rows, 1):
        if _format(row) != kind:
            raise DataError(f"{path}:{n}: a {_format(row)} line in a file of {kind} lines")
        try:
            prompt, response = render(tokenizer, row, kind)
        except Exception as e:  # the line's or the chat template's complaint
            raise DataError(f"{path}:{n}: cannot render this example ({e})") from None
        if not prompt or not response:
            raise DataError(
                f"{path}:{n}: the example has an empty {'prompt' if not prompt else 'response'}"
            )
        length = len(prompt) + ceil_div(len(response), canvas_length) * canvas_length
        if length > max_seq_length:
            raise DataError(
                f"{path}:{n}: {length} tokens (prompt + whole canvases) is over "
                f"--max-seq-length {max_seq_length}"
            )
        examples.append((prompt, response))
    return examples


def load_splits(data: str, tokenizer, canvas_length: int, max_seq_length: int, want):
    """{split: examples} for the wanted splits of a folder with train/valid/test.jsonl."""
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"--data {data}: not a folder with train.jsonl / valid.jsonl / test.jsonl")
    out = {}
    for split in want:
        f = folder / f"{split}.jsonl"
        if not f.exists():
            raise DataError(f"{f} is missing")
        out[split] = tokenize(f, tokenizer, canvas_length, max_seq_length)
    return out
