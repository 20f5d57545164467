"""Bundled demo through stream_generate and batch_generate: tok/s, seeded (same tokens in both checkouts)."""

import json
import sys
import time

from mlx_diffusiongemma import batch_generate, load, stream_generate

model, tok = load(None) if False else (None, None)
import pathlib

import mlx_diffusiongemma
from mlx_diffusiongemma.loader import load as _load

demo = pathlib.Path(mlx_diffusiongemma.__file__).parent / "demo"
model, tok = _load(str(demo))
puzzles = [
    "460000532046300560015430003000046010",
    "000000532046300560015430003000046010",
    "460000000046300560015430003000046010",
    "460000532046300000015430003000046010",
]


def one():
    n, toks = 0, []
    t = time.perf_counter()
    for s, p in enumerate(puzzles):
        for r in stream_generate(model, tok, p, seed=s):
            n += len(r.tokens)
            toks.append(r.tokens)
    return n / (time.perf_counter() - t), toks


def batch():
    t = time.perf_counter()
    r = batch_generate(model, tok, puzzles, seed=0)
    return sum(map(len, r.tokens)) / (time.perf_counter() - t), r.tokens


one()
batch()  # warm up
res = {"stream_tps": [], "batch_tps": []}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    a, ta = one()
    b, tb = batch()
    res["stream_tps"].append(round(a, 1))
    res["batch_tps"].append(round(b, 1))
res["tokens"] = [ta, tb]
print(json.dumps(res))
