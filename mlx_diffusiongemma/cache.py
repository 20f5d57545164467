"""The prompt KV cache: the encoder appends to it, the decoder only reads it."""

from typing import List, Optional

import mlx.core as mx


class PromptCache:
    """Keys and values of everything encoded so far (prompt, then each committed canvas).

    Full-attention layers keep every position. Sliding layers keep only the last
    `sliding_window - 1` positions, exactly what transformers' `DynamicSlidingWindowLayer`
    keeps: that is all a later causal query can see, and it is also the whole prefix the
    reference decoder's sliding layers attend to. Long prompts therefore do not grow them.
    """

    def __init__(self, layer_is_sliding: List[bool], sliding_window: int):
        self.is_sliding = list(layer_is_sliding)
        self.sliding_window = sliding_window
        self.keys: List[Optional[mx.array]] = [None] * len(layer_is_sliding)
        self.values: List[Optional[mx.array]] = [None] * len(layer_is_sliding)
        self.offset = 0  # total positions encoded so far

    def __len__(self):
        return self.offset

    def layer_len(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else k.shape[2]

    def fetch(self, layer: int):
        return self.keys[layer], self.values[layer]

    def store(self, layer: int, keys: mx.array, values: mx.array):
        """Stores the full (cached + new) keys/values of a layer, trimming sliding layers."""
        if self.is_sliding[layer]:
            keep = self.sliding_window - 1
            if keys.shape[2] > keep:
                keys = keys[:, :, keys.shape[2] - keep :]
                values = values[:, :, values.shape[2] - keep :]
        self.keys[layer] = keys
        self.values[layer] = values

    def state(self):
        return [a for a in self.keys + self.values if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state())
