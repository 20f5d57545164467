"""DiffusionGemma for MLX."""

from .config import ModelArgs
from .batch import batch_generate
from .generation import GenerationResponse, generate, make_prompt_cache, stream_generate
from .infill import infill
from .loader import load, load_model
from .model import Model

__all__ = [
    "ModelArgs", "Model", "GenerationResponse", "batch_generate", "generate", "infill", "load", "load_model",
    "make_prompt_cache", "stream_generate",
]
