"""Checkpointed LoRA step time at the mid shape: ours (ordered) vs mlx-lm's grad_checkpoint vs plain,
through tuner.trainer.train. From the repo root: python benchmarks/logs/lora_ckpt/ckspeed.py VARIANT
(ordered | mlx-lm | plain), one JSON line each."""

import json
import os
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx_lm.tuner.trainer import TrainingArgs

import mlx_diffusiongemma.tuner.trainer as T
from mlx_diffusiongemma.bench.lora import LORA_PARAMETERS, canvas_for, random_prompt
from mlx_diffusiongemma.bench.models import build_random_float, make_args
from mlx_diffusiongemma.bench.shapes import SHAPES
from mlx_diffusiongemma.tuner.adapters import prepare

variant = sys.argv[1]
if variant == "mlx-lm":
    import mlx_lm.tuner.trainer as mt

    def mlxlm(layer):
        cls = type(layer)
        f = cls.__call__
        mt.grad_checkpoint(layer)

        def undo():
            cls.__call__ = f

        return undo

    T.grad_checkpoint = mlxlm
args = make_args(SHAPES["mid"], canvas_length=canvas_for("mid"))
C, B, P, n = args.canvas_length, 2, 64, 4
mx.random.seed(0)
model = build_random_float(args, mx.float32, verbose=False)
prepare(model, "lora", -1, dict(LORA_PARAMETERS))
mx.eval(model.parameters())
data = [
    (random_prompt(P, args.vocab_size, i), random_prompt(C, args.vocab_size, 1000 + i))
    for i in range(B)
]
diff = T.DiffusionArgs(canvas_length=C, fill_token=1, vocab_size=args.vocab_size)
with tempfile.TemporaryDirectory() as d:
    log = Path(d) / "log.jsonl"
    targs = TrainingArgs(
        batch_size=B,
        iters=n + 1,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=P + C,
        grad_checkpoint=variant != "plain",
    )
    so = sys.stdout
    sys.stdout = open(os.devnull, "w")
    try:
        T.train(model, optim.Adam(learning_rate=1e-5), data, None, targs, diff, Path(d), log=log)
    finally:
        sys.stdout = so
    recs = [json.loads(l) for l in log.read_text().splitlines()]
secs = [1 / r["it_per_s"] for r in recs if r.get("iteration", 0) >= 2 and "it_per_s" in r]
print(
    json.dumps(
        dict(
            variant=variant,
            steps=[round(s, 2) for s in secs],
            it_s=round(len(secs) / sum(secs), 4),
            peak=max(r["peak_memory_gb"] for r in recs),
        )
    ),
    flush=True,
)
