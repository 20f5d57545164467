"""Writing a model as a checkpoint folder `load` reads (Hugging Face key names, as convert.py
and the mlx-community repos write them), atomically: a temporary folder renamed at the end."""

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from mlx.utils import tree_flatten

from .convert import shard, write_safetensors

COPIED = (
    "tokenizer*",
    "chat_template*",
    "generation_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "task.json",
)


def checkpoint_weights(model) -> dict:
    """The model's parameters under checkpoint key names (experts as the reference stores
    them when unquantized)."""
    out = dict(tree_flatten(model.parameters()))
    quantized = {k[: -len(".scales")] for k in out if k.endswith(".scales")}
    renamed = {}
    for k, v in out.items():
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if (
            base
            and base.endswith((".experts.gate_up_proj", ".experts.down_proj"))
            and base not in quantized
        ):
            k = base
        renamed[k] = v
    return renamed


def save_model(
    model,
    config: dict,
    out,
    source: Optional[Path] = None,
    max_shard_size: int = 5 << 30,
    extra_files: Optional[dict] = None,
) -> Path:
    """Writes `model` with `config` (config.json's content) to the folder `out`, copying the
    tokenizer and generation files from `source`; `extra_files` maps names to text."""
    out = Path(out).expanduser().absolute()
    weights = checkpoint_weights(model)
    groups = [[(k, v)] for k, v in sorted(weights.items())]
    shards = shard(groups, max_shard_size)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map = {}
        for name, entries in zip(names, shards):
            weight_map.update({k: name for k, _ in entries})
            write_safetensors(tmp / name, entries)
        if len(names) > 1:
            total = sum(v.nbytes for v in weights.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps(
                    {
                        "metadata": {"total_size": total},
                        "weight_map": dict(sorted(weight_map.items())),
                    },
                    indent=2,
                )
            )
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if source is not None:
            for pattern in COPIED:
                for f in Path(source).glob(pattern):
                    if not f.is_file():
                        raise FileNotFoundError(f"{f} cannot be read (a broken link?)")
                    shutil.copy(f, tmp / f.name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
