"""Data-parallel fine-tuning on `mx.distributed` ranks (`mlx.launch ... -- python -m
mlx_diffusiongemma.lora ...`), the way mlx-lm's trainer does it: every rank holds the whole model
and reads the whole dataset, takes its rows of each batch (`Batches`), and the compiled step
averages the gradients (mlx-lm's `average_gradients`). What is here: joining the ranks under a
watchdog, rank 0 alone on stdout, and a check that every rank trains the same thing (a lost
peer is one line: `lora.run`).
"""

import hashlib
import json
import os
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..cli import launched
from ..watchdog import Watchdog, timeout_setting

SAMPLE = 256  # elements of each parameter that its digest reads


def connect():
    """(the global group, the rank's watchdog or None). A rank of a launched run waits for the
    others under the watchdog: MLX's `init` waits forever for a peer that never comes."""
    if not launched():
        return mx.distributed.init(), None
    timeout = timeout_setting()
    watchdog = Watchdog(timeout)
    watchdog.expect(
        timeout,
        f"no connection to the other ranks within {timeout:g} s "
        "(is every rank started, and each one's address reachable?)",
    )
    group = mx.distributed.init()
    watchdog.clear()
    if group.size() == 1:
        watchdog.stop()
        return group, None
    if group.rank() > 0:  # rank 0 alone writes to stdout; errors still reach stderr
        sys.stdout.flush()
        sys.stdout = open(os.devnull, "w")
    return group, watchdog


def digest(obj) -> bytes:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).digest()


def parameters_digest(params) -> bytes:
    """Names, shapes, dtypes and the first SAMPLE elements of each parameter: enough to tell
    two checkpoints or two initializations apart without reading every weight."""
    h = hashlib.sha256()
    for name, p in tree_flatten(params):
        h.update(f"{name}{p.shape}{p.dtype}".encode())
        head = p.reshape(-1)[:SAMPLE]
        if head.dtype == mx.bfloat16:
            head = head.astype(mx.float32)
        h.update(np.array(head).tobytes())
    return h.digest()


def check_same(group, parts: dict):
    """Every rank must hold the same of each part ({name: digest bytes}): else every rank
    ends with the same one-line error naming the part and the first rank that differs."""
    names = list(parts)
    mine = np.frombuffer(b"".join(parts[n][:32] for n in names), dtype=np.int32)
    every = np.array(mx.distributed.all_gather(mx.array(mine)[None], group=group))
    for r in range(1, group.size()):
        for i, name in enumerate(names):
            if (every[r, 8 * i : 8 * i + 8] != every[0, 8 * i : 8 * i + 8]).any():
                raise ValueError(
                    f"rank {r} has other {name} than rank 0: start every rank with the same "
                    "model, data, adapters and flags"
                )
