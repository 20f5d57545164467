"""DiffusionGemma for MLX."""

from .config import ModelArgs
from .loader import load, load_model
from .model import Model

__all__ = ["ModelArgs", "Model", "load", "load_model"]
