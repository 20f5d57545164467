"""Seeded tokens of every caller, to compare two checkouts: CKPT TEXT_DEMO OUT.json."""

import json
import sys
import threading

import mlx.core as mx

from mlx_diffusiongemma import batch_generate, load, load_model, stream_generate
from mlx_diffusiongemma.sampler import SamplerSettings
from mlx_diffusiongemma.serving.scheduler import Job, Scheduler

try:
    from mlx_diffusiongemma.infilling import Gap, infill
except ImportError:  # a checkout from before the module's rename (8b69d6e and earlier)
    from mlx_diffusiongemma.infill import Gap, infill
from mlx_diffusiongemma.chat import ChatSession

ckpt, demo, out = sys.argv[1:4]
res = {}
model = load_model(ckpt, dtype=mx.float32)
for seed in (0, 1, 7):
    for steps, mt in ((4, 40), (12, 16), (48, 50)):
        rs = list(
            stream_generate(
                model,
                None,
                [5, 6, 7, 8][: 2 + seed % 3],
                max_tokens=mt,
                seed=seed,
                max_denoising_steps=steps,
            )
        )
        res[f"stream {seed} {steps} {mt}"] = [r.tokens for r in rs] + [[r.steps for r in rs]]
for seed in (0, 3):
    b = batch_generate(
        model,
        None,
        [[5, 6], [9, 10, 11, 12, 13], [7]],
        max_tokens=40,
        seed=seed,
        max_denoising_steps=6,
    )
    res[f"batch {seed}"] = b.tokens + [b.finish_reasons]
    b = batch_generate(
        model,
        None,
        [[5, 6], [9, 10, 11, 12, 13]],
        max_tokens=40,
        seed=seed,
        max_denoising_steps=6,
        eos_token_ids=[b.tokens[0][3] if len(b.tokens[0]) > 3 else 1],
    )
    res[f"batch eos {seed}"] = b.tokens + [b.finish_reasons]
r = infill(model, None, [[5, 6, 7], Gap(4), [9, 10], Gap(), [11]], seed=4, max_denoising_steps=8)
res["infill"] = r.fill_tokens
# chat on the text demo (tokenizer, template, prompt cache)
m2, tok = load(demo)
s = ChatSession(m2, tok)
for i, t in enumerate(["hello there", "and again", "third"]):
    res[f"chat {i}"] = [r.tokens for r in s.send(t, seed=i, max_tokens=40, max_denoising_steps=5)]


# server scheduler: several at once, different settings and seeds, n > 1
class Rec(Job):
    def __init__(self, prompt, mt, seed, n=1, steps=3):
        super().__init__(prompt, SamplerSettings(max_tokens=mt, max_denoising_steps=steps), n, seed)
        self.tokens = [[] for _ in range(n)]
        self.fin = [None] * n
        self.done = threading.Event()

    def on_tokens(self, row, tokens, finish):
        self.tokens[row] += tokens
        return False

    def on_done(self, row, finish):
        self.fin[row] = finish
        if all(self.fin):
            self.done.set()

    def on_error(self, m):
        self.fin = [m] * self.n
        self.done.set()


sch = Scheduler(model, None, max_batch=8)
jobs = [
    Rec([4, 5, 6], 48, 1),
    Rec([9, 8, 7, 6, 5], 20, 2, n=2),
    Rec([3, 4], 33, 5, steps=6),
    Rec([4, 5, 6, 7], 16, 9, n=3, steps=6),
]
for j in jobs:
    sch.submit(j)
for j in jobs:
    assert j.done.wait(300)
sch.stop()
for i, j in enumerate(jobs):
    res[f"server {i}"] = j.tokens + [j.fin]
json.dump(res, open(out, "w"))
print(len(res), "cases")
