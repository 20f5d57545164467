"""What each rank runs for test_distributed.py (and what the test runs in one process, to compare):

    python tests/distributed_worker.py checks OUT MODE SHARP PATH...   # MODE: tensor | pipeline
    python tests/distributed_worker.py die
    python tests/distributed_worker.py stall

`checks` loads SHARP (a near-greedy checkpoint; "-": none) and each PATH split over the launched
ranks, and writes OUT.<rank>.npz: the tokens of SHARP's seeded generations (stream over three
canvases, batch, infill, an image prompt) and of an unseeded one, and each PATH's logits on both
backends' routes. `die`: rank 1 is killed while rank 0 waits on it inside the CLI's error handling. `stall`:
rank 1 stops (SIGSTOP) while rank 0 waits on it, with the watchdog on.
"""

import json
import os
import signal
import sys

import mlx.core as mx
import numpy as np

from mlx_diffusiongemma import backends
from mlx_diffusiongemma.batch import batch_generate
from mlx_diffusiongemma.distributed import init_group
from mlx_diffusiongemma.generation import stream_generate
from mlx_diffusiongemma.infill import Gap, infill
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
    vision = stream_generate(model, None, prompt, max_tokens=C, seed=4, images=[image], **NEAR_GREEDY)
    out["image"] = sum((r.tokens for r in vision), [])
    out["unseeded"] = sum((r.tokens for r in stream_generate(model, None, prompt, max_tokens=C)), [])
    return {k: np.array(v) for k, v in out.items()}


def checks(out: str, mode: str, sharp: str, *others: str, group=None, split=None):
    """The generations on SHARP ("-": none) and the logits of the OTHERS (float32, or as
    quantized), in one process (group None) or on this rank; returns them, and writes them to
    OUT.<rank>.npz when run on a rank."""
    kw = {}
    if group is not None and mode == "pipeline":
        kw = dict(pipeline_group=group, pipeline_split=split)
    elif group is not None:
        kw = dict(tensor_group=group)
    results = {}
    if sharp != "-":
        model = load_model(sharp, dtype=mx.float32, **kw)
        results.update({f"gen.{k}": v for k, v in generations(model).items()})
    for i, path in enumerate(others):
        model = load_model(path, dtype=mx.float32, **kw)
        results.update({f"logits{i}.{k}": v for k, v in logits(model).items()})
    if group is not None:
        np.savez(f"{out}.{group.rank()}.npz", **results)
    return results


def die():
    """Rank 1 dies (SIGKILL) between two collectives; rank 0 waits on it as the CLI does."""
    from mlx_diffusiongemma.cli import run_cli

    group = init_group()

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
        out, mode, *paths = rest
        split = json.loads(os.environ["SPLIT"]) if os.environ.get("SPLIT") else None
        checks(out, mode, *paths, group=init_group(), split=split)
    else:
        {"die": die, "stall": stall}[what]()
