"""The bundled demo through stream_generate (4 puzzles one by one) and batch_generate (the 4 at
once): tok/s per trial, and the tokens (equal in both checkouts). `python demo_speed.py TRIALS`
with the checkout to measure on PYTHONPATH."""

import json
import sys
import time
from pathlib import Path

import mlx_diffusiongemma
from mlx_diffusiongemma import batch_generate, load, stream_generate

model, tok = load(str(Path(mlx_diffusiongemma.__file__).parent / "demo"))
PUZZLES = [
    "460000532046300560015430003000046010",
    "000000532046300560015430003000046010",
    "460000000046300560015430003000046010",
    "460000532046300000015430003000046010",
]


def one_by_one():
    n, tokens, tic = 0, [], time.perf_counter()
    for seed, p in enumerate(PUZZLES):
        for r in stream_generate(model, tok, p, seed=seed):
            n += len(r.tokens)
            tokens.append(r.tokens)
    return n / (time.perf_counter() - tic), tokens


def together():
    tic = time.perf_counter()
    r = batch_generate(model, tok, PUZZLES, seed=0)
    return sum(map(len, r.tokens)) / (time.perf_counter() - tic), r.tokens


one_by_one(), together()  # warm up
res = {"stream_tps": [], "batch_tps": []}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    a, ta = one_by_one()
    b, tb = together()
    res["stream_tps"].append(round(a, 1))
    res["batch_tps"].append(round(b, 1))
res["tokens"] = [ta, tb]
print(json.dumps(res))
