"""The prompt KV cache: the encoder appends to it, the decoder only reads it."""

import copy
from typing import List, Optional, Union

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
        # (B, offset) bool: which positions are real tokens. None while nothing was padded.
        self.valid: Optional[mx.array] = None

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
                # copies: a sliced view would keep the whole untrimmed buffer alive
                keys = mx.contiguous(keys[:, :, keys.shape[2] - keep :])
                values = mx.contiguous(values[:, :, values.shape[2] - keep :])
        self.keys[layer] = keys
        self.values[layer] = values

    def add_validity(self, shape, mask: Optional[mx.array]):
        """Records which of the (B, L) positions being appended are real tokens: `mask`, or
        all of them when None. Costs nothing until some position is padding."""
        if mask is None:
            if self.valid is None:
                return
            mask = mx.ones(shape, dtype=mx.bool_)
        if self.valid is None:
            self.valid = mx.ones((shape[0], self.offset), dtype=mx.bool_)
        self.valid = mx.concatenate([self.valid, mask.astype(mx.bool_)], axis=1)

    def key_validity(self, layer: int) -> Optional[mx.array]:
        """(B, layer_len) validity of the positions a layer holds, or None when all are real."""
        if self.valid is None:
            return None
        n = self.layer_len(layer)
        return self.valid[:, self.valid.shape[1] - n :]

    def filter(self, rows):
        """Keeps only the given batch rows (finished rows leave the batch between canvases)."""
        idx = mx.array(rows, dtype=mx.int32)
        self.keys = [None if k is None else k[idx] for k in self.keys]
        self.values = [None if v is None else v[idx] for v in self.values]
        if self.valid is not None:
            self.valid = self.valid[idx]

    def copy(self) -> "PromptCache":
        """An independent cache holding the same positions. Cheap: the arrays are shared, and
        `store` / `filter` replace arrays rather than write into them."""
        new = copy.copy(self)
        new.keys, new.values = list(self.keys), list(self.values)
        return new

    def snapshot(self):
        """The cache as it is now; `restore` returns to it (arrays are never written in place:
        every update replaces them), e.g. when a chat reply is stopped half-way."""
        return list(self.keys), list(self.values), self.offset, self.valid

    def restore(self, snapshot):
        keys, values, self.offset, self.valid = snapshot
        self.keys, self.values = list(keys), list(values)

    def state(self):
        extra = [] if self.valid is None else [self.valid]
        return [a for a in self.keys + self.values if a is not None] + extra

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state())


def _left_padded(rows: List[PromptCache], layer: int):
    """Layer `layer`'s (keys, values, validity) of several caches stacked on the batch axis,
    the shorter ones left-padded; validity None when no position is padding."""
    if len(rows) == 1:
        k, v = rows[0].fetch(layer)
        return k, v, rows[0].key_validity(layer)
    lens = [r.layer_len(layer) for r in rows]
    P = max(lens)
    if P == 0:
        return None, None, None
    like = rows[lens.index(P)].fetch(layer)[0]  # (1, H, P, D)
    keys, values, valid = [], [], []
    for r, n in zip(rows, lens):
        k, v = r.fetch(layer)
        B = r.keys[0].shape[0] if r.keys[0] is not None else 1
        own = r.key_validity(layer)
        if own is None:
            own = mx.ones((B, n), dtype=mx.bool_)
        if n < P:
            pad = mx.zeros((B, like.shape[1], P - n, like.shape[3]), dtype=like.dtype)
            k = pad if k is None else mx.concatenate([pad, k], axis=2)
            v = pad if v is None else mx.concatenate([pad, v], axis=2)
            own = mx.concatenate([mx.zeros((B, P - n), dtype=mx.bool_), own], axis=1)
        keys.append(k)
        values.append(v)
        valid.append(own)
    valid = mx.concatenate(valid)
    return (
        mx.concatenate(keys),
        mx.concatenate(values),
        None if min(lens) == P and all(r.valid is None for r in rows) else valid,
    )


def prefix_bucket(n: int) -> int:
    """The length a prefix of `n` positions is padded to for a compiled step: `n` rounded up to a
    multiple of a quarter of the power of two at or above it (at least 16), i.e. to 1.5 or 2
    times a power of two. A prefix that grows by a canvas at a time thus changes shape twice per
    doubling (O(log) times over a generation, each a trace), and at most a third of what is
    attended to is padding."""
    granule = max(16, 1 << max(0, (n - 1).bit_length() - 2))
    return -(-n // granule) * granule


def row_bucket(n: int) -> int:
    """The rows a batch of `n` is padded to for a compiled step: the power of two at or above."""
    return 1 << max(0, (n - 1).bit_length())


class CanvasKV:
    """Per-canvas attention buffers for the decoder: each layer's visible prefix K/V copied once,
    followed by room for the canvas's own K/V, which every denoising step writes in place. The
    prefix is thus not concatenated again at every step; the prompt cache stays untouched.

    `cache` may also be a list of one-row PromptCaches of different lengths (a server's rows,
    each encoded on its own): their prefixes are left-padded to one length, the padding masked,
    and `offset` becomes one position per row, so each row's canvas sits where it would alone
    (RoPE takes per-row offsets).

    `padded` (the compiled step, step.py): shapes that stay put across canvases. Each layer's
    prefix is left-padded to `prefix_bucket` of its length and every layer has a mask, the rows
    are padded to `row_bucket` of their number with copies of row 0 (`rows` counts the real
    ones; `filter` keeps the padding at the smaller bucket), and `offset` is an array."""

    def __init__(
        self,
        cache: Union[PromptCache, List[PromptCache]],
        canvas_len: int,
        padded: bool = False,
    ):
        rows = cache if isinstance(cache, list) else [cache]
        offsets = [r.offset for r in rows]
        self.offset = offsets[0] if len(set(offsets)) == 1 else mx.array(offsets, dtype=mx.int32)
        self.keys, self.values, self.prefix_len, self.masks = [], [], [], []
        self.padded = padded
        for i in range(len(rows[0].keys)):
            k, v, valid = _left_padded(rows, i)
            P = 0 if k is None else k.shape[2]
            pad = 0
            if padded and k is not None:  # every layer masked, padding included
                pad = prefix_bucket(P) - P
                if valid is None:
                    valid = mx.ones((k.shape[0], P), dtype=mx.bool_)
                valid = mx.concatenate([mx.zeros((k.shape[0], pad), dtype=mx.bool_), valid], 1)
            self.prefix_len.append(P + pad)
            room = [(0, 0), (0, 0), (pad, canvas_len), (0, 0)]  # (B, H, pad + P + C, D)
            self.keys.append(None if k is None else mx.pad(k, room))
            self.values.append(None if v is None else mx.pad(v, room))
            if valid is not None:  # padded prompt positions stay hidden from the canvas
                ones = mx.ones((valid.shape[0], canvas_len), dtype=mx.bool_)
                valid = mx.concatenate([valid, ones], axis=1)[:, None, None, :]
            self.masks.append(valid)
        self.rows = self.padded_rows  # real rows
        if padded:
            if not isinstance(self.offset, mx.array):
                self.offset = mx.array(self.offset, dtype=mx.int32)
            if row_bucket(self.rows) > self.rows:
                self._take(list(range(self.rows)) + [0] * (row_bucket(self.rows) - self.rows))
        mx.eval([a for a in self.keys + self.values + self.masks if a is not None])

    @classmethod
    def of_arrays(cls, keys, values, masks, offset, canvas_len: int) -> "CanvasKV":
        """Buffers given as arrays (inside a compiled step: its inputs), with each layer's
        prefix length read from their shapes."""
        kv = cls.__new__(cls)
        kv.keys, kv.values, kv.masks, kv.offset = list(keys), list(values), list(masks), offset
        kv.prefix_len = [k.shape[2] - canvas_len for k in keys]
        kv.padded, kv.rows = True, keys[0].shape[0]
        return kv

    @property
    def padded_rows(self) -> int:
        """Rows of the buffers: `rows`, or with `padded` its row bucket."""
        k = next((k for k in self.keys if k is not None), None)
        return 1 if k is None else k.shape[0]

    def attend(self, layer: int, k: mx.array, v: mx.array):
        """Writes this step's canvas K/V after the prefix; returns what the canvas attends to."""
        if self.keys[layer] is None:
            return k, v
        P = self.prefix_len[layer]
        # New handles on the buffers (`[...]`: no operation; mx.array(buffer) would add a copy
        # to every step's graph), written in place: a snapshot keeps the arrays before the
        # write (the write itself still reuses the buffer once nothing else holds it).
        keys, values = self.keys[layer][...], self.values[layer][...]
        keys[:, :, P:, :] = k
        values[:, :, P:, :] = v
        self.keys[layer], self.values[layer] = keys, values
        return keys, values

    def snapshot(self):
        """The buffers as they are now: a step built after this and then dropped would leave
        its (lazy) K/V writes behind; `restore` takes them back so nothing evaluates them."""
        return list(self.keys), list(self.values)

    def restore(self, snapshot):
        self.keys, self.values = list(snapshot[0]), list(snapshot[1])

    def filter(self, rows):
        """Keeps only the given batch rows (rows that stop denoising leave the batch); with
        `padded`, padded to the row bucket of what is left (not above the present one)."""
        rows = list(rows)
        n = len(rows)
        if self.padded:
            rows += [rows[0]] * (min(self.padded_rows, row_bucket(n)) - n)
        self._take(rows)
        self.rows = n

    def _take(self, rows):
        idx = mx.array(rows, dtype=mx.int32)
        self.keys = [None if a is None else a[idx] for a in self.keys]
        self.values = [None if a is None else a[idx] for a in self.values]
        self.masks = [None if a is None else a[idx] for a in self.masks]
        if isinstance(self.offset, mx.array) and self.offset.ndim == 1:
            self.offset = self.offset[idx]
