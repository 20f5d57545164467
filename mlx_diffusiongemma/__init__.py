"""DiffusionGemma for MLX.

The public names are imported on first use, so that the command-line tools start (and handle
Ctrl-C) before MLX and the model code are loaded."""

import importlib

_EXPORTS = {
    "ModelArgs": "config",
    "Model": "model",
    "GenerationResponse": "generation",
    "batch_generate": "batch",
    "generate": "text",
    "infill": "infilling",
    "load": "loader",
    "load_model": "loader",
    "make_prompt_cache": "generation",
    "sharded_load": "distributed",
    "stream_generate": "generation",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
