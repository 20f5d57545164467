"""Training data: mlx-lm's jsonl formats, split into what the encoder reads and the canvases.

`{"messages": [...]}` (with `"tools"`) and `{"prompt", "completion"}` lines go through the chat
template exactly as mlx-lm's datasets render them (which is also how a prompt is rendered at
inference): everything before the last assistant turn is the prompt, the assistant turn (with its
end-of-turn token) is the response. A `{"text"}` line has no prompt of its own: the encoder reads
its first token (the tokenizer's BOS where it adds one) and the rest of the text is the response.
"""

import json
import types
from pathlib import Path
from typing import List, Tuple

from mlx_lm.tuner.datasets import create_dataset

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


def tokenize(path: Path, tokenizer, canvas_length: int, max_seq_length: int) -> List[Example]:
    """Every line of one jsonl file as (prompt ids, response ids); errors name file and line."""
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path} holds no examples")
    kind = _format(rows[0])
    if kind == "unknown":
        raise DataError(f"{path}:1: expected {{'messages'}}, {{'prompt', 'completion'}} or "
                        "{'text'} keys")
    data = create_dataset(rows, tokenizer, types.SimpleNamespace(mask_prompt=kind != "text"))
    examples = []
    for n, row in enumerate(rows, 1):
        if _format(row) != kind:
            raise DataError(f"{path}:{n}: a {_format(row)} line in a file of {kind} lines")
        try:
            tokens, offset = data.process(row)
        except Exception as e:  # the chat template's own complaint, e.g. a bad role
            raise DataError(f"{path}:{n}: cannot render this example ({e})") from None
        tokens = list(tokens)
        if kind == "text":
            offset = 1
        prompt, response = tokens[:offset], tokens[offset:]
        if not prompt or not response:
            raise DataError(f"{path}:{n}: the example has an empty "
                            f"{'prompt' if not prompt else 'response'}")
        length = len(prompt) + -(-len(response) // canvas_length) * canvas_length
        if length > max_seq_length:
            raise DataError(f"{path}:{n}: {length} tokens (prompt + whole canvases) is over "
                            f"--max-seq-length {max_seq_length}")
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
