"""Fine-tuning DiffusionGemma with its own diffusion objective, on mlx-lm's tuner."""

from .losses import Batch, batch_loss, diffusion_loss

__all__ = ["Batch", "batch_loss", "diffusion_loss"]
