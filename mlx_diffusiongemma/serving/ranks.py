"""The server on several ranks (`mlx.launch`): rank 0 serves HTTP and decides; every other rank
follows, so that all of them run the same model calls in the same order (each call of a sharded
model is a collective). What rank 0 decides reaches the others through `RankLink`: which jobs
start (their prompt, settings, seed and images), which rows leave, and, at every denoising step,
which rows the clients cancelled."""

import base64
import io
import json
from dataclasses import asdict
from typing import List, Optional

import mlx.core as mx
import numpy as np

from ..denoise import Pins
from ..sampler import SamplerSettings


class RankLink:
    """Rank 0's messages to every rank of `group`, each an all-sum in which only rank 0's part
    is not zero (a length, then the bytes as int32 words)."""

    def __init__(self, group):
        self.group = group
        self.leader = group.rank() == 0

    def _sum(self, x: mx.array) -> np.ndarray:
        try:
            return np.array(mx.distributed.all_sum(x, group=self.group))
        except RuntimeError as e:  # a peer's connection closed: no rank can go on
            from ..distributed import fail

            fail(f"rank {self.group.rank()}: lost the connection to another rank ({e})")

    def share(self, message: Optional[dict] = None) -> Optional[dict]:
        """Rank 0's `message` (JSON-able) on every rank; None ends the conversation."""
        data = b"" if message is None else json.dumps(message).encode()
        data += b"\0" * (-len(data) % 4)
        n = int(self._sum(mx.array([len(data) if self.leader else 0], dtype=mx.int32))[0])
        if n == 0:
            return None
        words = np.frombuffer(data, dtype=np.int32) if self.leader else np.zeros(n // 4, np.int32)
        return json.loads(self._sum(mx.array(words)).tobytes().rstrip(b"\0"))

    def agree(self, flags: List[bool]) -> List[bool]:
        """Rank 0's flags (one per row) on every rank."""
        mine = flags if self.leader else [False] * len(flags)
        return [bool(f) for f in self._sum(mx.array(mine, dtype=mx.int32))]


def job_spec(job) -> dict:
    """What another rank needs of a job to run its rows as rank 0 does."""
    return {
        "prompt": job.prompt,
        "settings": asdict(job.settings),
        "n": job.n,
        "seed": job.seed,
        "images": [_png(i) for i in job.images],
        "pins": None if job.pins is None else [job.pins.mask.tolist(), job.pins.tokens.tolist()],
        "gap": job.gap,
    }


def follower_job(spec: dict):
    """A job with rank 0's prompt, settings and seed, and no client to report to."""
    from .scheduler import Job

    pins = spec["pins"]
    return Job(
        spec["prompt"],
        SamplerSettings(**spec["settings"]),
        spec["n"],
        spec["seed"],
        images=[_unpng(i) for i in spec["images"]],
        pins=None if pins is None else Pins(mx.array(pins[0]), mx.array(pins[1], dtype=mx.int32)),
        gap=None if spec["gap"] is None else tuple(spec["gap"]),
    )


def _png(image) -> str:
    """A PIL image as base64 PNG: lossless, and its mode (alpha, palette) kept."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _unpng(data: str):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image
