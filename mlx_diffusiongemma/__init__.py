"""DiffusionGemma for MLX."""

from .config import ModelArgs
from .generation import GenerationResponse, generate, stream_generate
from .loader import load, load_model
from .model import Model

__all__ = ["ModelArgs", "Model", "GenerationResponse", "generate", "load", "load_model", "stream_generate"]
