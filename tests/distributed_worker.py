"""What each rank runs for test_distributed.py (and what the test runs in one process, to compare):

    python tests/distributed_worker.py checks OUT MODE:KIND:PATH...
    python tests/distributed_worker.py die
    python tests/distributed_worker.py stall

`checks` loads each PATH split over the launched ranks (MODE tensor or pipeline) and writes to
OUT.<rank>.npz what KIND says: `gen`, the tokens of seeded near-greedy generations (stream over
three canvases, batch, infill, an image prompt, the default backend's compiled step) and of an
unseeded one; `logits`, the logits on both backends' routes. `die`: rank 1 is killed while rank
0 waits on it inside the CLI's error handling. `stall`: rank 1 stops (SIGSTOP) while rank 0 waits
on it, with the watchdog on.
"""

import os
import signal
import sys

import mlx.core as mx
import numpy as np

from mlx_diffusiongemma import backends
from mlx_diffusiongemma.batch import batch_generate
from mlx_diffusiongemma.distributed import init_group, rank_zero_output
from mlx_diffusiongemma.generation import stream_generate
from mlx_diffusiongemma.infilling import Gap, infill
from mlx_diffusiongemma.loader import load_model

IDS = [[2, 5, 7, 9, 11, 13, 200, 300, 17, 19, 23, 29]]
CANVAS = [[4, 8, 15, 16, 23, 42, 1, 3, 5, 7, 100, 200, 300, 6, 9, 12]]
NEAR_GREEDY = dict(t_min=1e-4, t_max=2e-4, max_denoising_steps=6, eos_token_ids=[])


def logits(model) -> dict:
    """The reference forward's logits on the default (Metal/CUDA) and the CPU backend's routes."""
    out = {}
    for name, backend in (("cpu", backends.CPU), ("default", backends.DEFAULT)):
        with backends.using(backend):
            out[name] = np.array(model(mx.array(IDS), mx.array(CANVAS)))
    return out


def generations(model) -> dict:
    """Token ids of seeded near-greedy generations through every entry point."""
    from PIL import Image

    C = model.args.canvas_length
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 300, 10).tolist()
    out = {}
    stream = stream_generate(model, None, prompt, max_tokens=3 * C, seed=1, **NEAR_GREEDY)
    out["stream"] = sum((r.tokens for r in stream), [])
    prompts = [rng.integers(3, 300, n).tolist() for n in (4, 11, 7)]
    res = batch_generate(model, None, prompts, max_tokens=2 * C, seed=2, **NEAR_GREEDY)
    out["batch"] = sum(res.tokens, [])
    segments = [prompt, Gap(5), [40, 41, 42], Gap(), [50]]
    out["infill"] = sum(infill(model, None, segments, seed=3, **NEAR_GREEDY).fill_tokens, [])
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    vision = stream_generate(
        model, None, prompt, max_tokens=C, seed=4, images=[image], **NEAR_GREEDY
    )
    out["image"] = sum((r.tokens for r in vision), [])
    out["unseeded"] = sum(
        (r.tokens for r in stream_generate(model, None, prompt, max_tokens=C)), []
    )
    with backends.using(backends.DEFAULT):  # Metal's and CUDA's route: the compiled step
        stream = stream_generate(model, None, prompt, max_tokens=2 * C, seed=5, **NEAR_GREEDY)
        out["default_backend"] = sum((r.tokens for r in stream), [])
    return {k: np.array(v) for k, v in out.items()}


def run_job(kind: str, path: str, **sharding) -> dict:
    """One check: `gen` (the generations above, float32) or `logits` (float32, or as quantized)
    of the checkpoint at `path`, loaded with `sharding` (`load_model`'s groups)."""
    model = load_model(path, dtype=mx.float32, **sharding)
    return generations(model) if kind == "gen" else logits(model)


def checks(out: str, *jobs: str):
    """Runs each JOB, `MODE:KIND:PATH` (MODE: tensor, pipeline or pipeline/3-2-1 for layers per
    rank; KIND: gen or logits), on this rank and writes the results to OUT.<rank>.npz, keyed
    `JOB.name`."""
    group = init_group()
    results = {}
    for job in jobs:
        mode, kind, path = job.split(":", 2)
        sharding = dict(tensor_group=group)
        if mode.startswith("pipeline"):
            split = [int(n) for n in mode.split("/")[1].split("-")] if "/" in mode else None
            sharding = dict(pipeline_group=group, pipeline_split=split)
        results.update({f"{job}.{k}": v for k, v in run_job(kind, path, **sharding).items()})
    np.savez(f"{out}.{group.rank()}.npz", **results)


def die():
    """Rank 1 dies (SIGKILL) between two collectives; rank 0 waits on it as the CLI does."""
    from mlx_diffusiongemma.cli import run_cli

    group = init_group()
    rank_zero_output(group)  # as the CLI

    def body():
        for i in range(1000):
            if group.rank() == 1 and i == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            mx.eval(mx.distributed.all_sum(mx.ones((256,)), group=group))

    sys.exit(run_cli(body))


def stall():
    """Rank 1 stops answering (SIGSTOP) after the group is up; rank 0 waits on it."""
    group = init_group()
    if group.rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    while True:
        mx.eval(mx.distributed.all_sum(mx.ones((256,)), group=group))


if __name__ == "__main__":
    what, *rest = sys.argv[1:]
    if what == "checks":
        checks(*rest)
    else:
        {"die": die, "stall": stall}[what]()
