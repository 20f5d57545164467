"""Layers the text model (model.py) and the vision tower (vision.py) share."""

import mlx.core as mx
import mlx.nn as nn


class RMSNormNoScale(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, None, self.eps)
