"""Arguments and dispatch of `python -m benchmarks.harness SECTION`."""

import argparse
import os
import sys
import time

from mlx_diffusiongemma.bench.common import Report, maybe_reexec_with_openblas, say
from mlx_diffusiongemma.bench.shapes import SHAPES

from .common import CpuMeter, wait_idle

# the package's own sections: `python -m mlx_diffusiongemma.benchmark SECTION`
PACKAGE_SECTIONS = ("weights", "gpu")


def parse(argv, sections, doc=""):
    if argv and argv[0] in PACKAGE_SECTIONS:
        raise SystemExit(
            f"error: {argv[0]} is a section of the package's benchmark: "
            f"python -m mlx_diffusiongemma.benchmark {' '.join(argv)}"
        )
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.harness", description=doc.split("\n\n")[0]
    )
    p.add_argument("section", choices=list(sections))
    p.add_argument("--json", help="append each section's figures to this file as JSON lines")
    p.add_argument(
        "--workdir",
        default=os.environ.get("DG_BENCH_WORKDIR", "/tmp/dg-bench"),
        help="where the mid-size checkpoint is written (default /tmp/dg-bench)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers (fullwidth: 2; build, graph, gpu-step: 30)",
    )
    p.add_argument(
        "--prompt",
        type=int,
        default=None,
        help="prompt tokens (fullwidth, gpu-step, graph: 4096; peers, profile, lora: 512)",
    )
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (encode step)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="fullwidth weights (bfloat16 on a CPU: expert weights are cast to float32 per call, which inflates the transients)",
    )
    p.add_argument("--steps", type=int, default=16, help="denoising steps per canvas")
    p.add_argument("--max-tokens", type=int, default=512, help="new tokens (peers)")
    p.add_argument("--ar-tokens", type=int, default=256, help="autoregressive tokens (peers)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skip",
        nargs="*",
        choices=["ours", "mlx-vlm", "ar", "reference", "prefill"],
        help="peers (vision: parts) to leave out",
    )
    p.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="gpu-step: vocabulary override (testing on a CPU); lora: the larger of the two measured vocabularies",
    )
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="full",
        help="gpu-step: model shape (tiny: CPU dry run); lora: width of the memory measurement (tiny: also the speed shape)",
    )
    p.add_argument("--allow-cpu", action="store_true", help="gpu-step: run on the CPU anyway")
    p.add_argument("--force", action="store_true", help="build: ignore the free-memory check")
    p.add_argument("--path", help="sudoku: the checkpoint (default: the bundled demo)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=300,
        help="wait up to this many seconds for other processes to leave the CPUs idle (0: don't)",
    )
    p.add_argument(
        "--reference-malloc",
        action="store_true",
        help="peers: run the reference a second time with the malloc thresholds load_model sets for MLX (cpu_memory.py)",
    )
    p.add_argument(
        "--server-model",
        choices=["demo", "mid"],
        default="demo",
        help="serve: the bundled demo checkpoint or the mid-size random one",
    )
    p.add_argument(
        "--concurrency", type=int, nargs="+", default=[4, 8], help="serve: requests sent at once"
    )
    p.add_argument("--request-tokens", type=int, default=64, help="serve: tokens per request")
    p.add_argument(
        "--part",
        choices=["all", "memory", "depth", "speed"],
        default="all",
        help="lora: memory: the extrapolation from two- and three-layer runs; depth: the "
        "checkpointed step measured at the real depth (layers share their frozen weights); speed: "
        "at the mid shape; all: the three",
    )
    p.add_argument(
        "--num-layers",
        type=int,
        nargs="+",
        default=[16, -1],
        help="lora --part depth: the adapted layers, as mlx_lm.lora's --num-layers (16, its "
        "default, and -1, all)",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="lora: measure the memory steps uncompiled (no C++ kernel builds on a CPU; peaks higher than mlx-lm's compiled step)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="lora: three memory runs instead of four (a full-attention layer counted as a sliding one)",
    )
    p.add_argument("--batch-size", type=int, default=2, help="lora: batch of the speed measurement")
    p.add_argument(
        "--train-prompt", type=int, default=64, help="lora: prompt tokens of the speed measurement"
    )
    p.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="lora: the speed measurement with --grad-checkpoint (the memory parts measure both)",
    )
    p.add_argument(
        "--puzzles", type=int, default=256, help="sudoku: held-out puzzles at half givens"
    )
    p.add_argument("--exclude", help="sudoku: a train.jsonl whose puzzles are kept out")
    p.add_argument(
        "--no-openblas", action="store_true", help="do not re-execute with OpenBLAS preloaded"
    )
    o = p.parse_args(argv)
    defaults = {
        "fullwidth": (2, 4096),
        "build": (30, None),
        "gpu-step": (30, 4096),
        "peers": (None, 512),
        "profile": (None, 512),
        "_reference": (None, 512),
        "graph": (30, 4096),
        "serve": (None, 32),
        "lora": (None, 512),
        "sudoku": (None, None),
        "vision": (None, None),
        "_vision_reference": (None, None),
    }
    dl, dp = defaults[o.section]
    if o.section == "gpu-step" and o.shape != "full":
        dl = SHAPES[o.shape]["num_hidden_layers"]
    o.layers = o.layers if o.layers is not None else dl
    o.prompt = o.prompt if o.prompt is not None else dp
    if o.section == "fullwidth" and o.repeat == 3:
        o.repeat = 2
    if o.section == "lora" and o.repeat == 3:
        o.repeat = 2
    if o.section == "graph" and o.repeat == 3:
        o.repeat = 7
    if o.section in ("vision", "_vision_reference") and o.repeat == 3:
        o.repeat = 2
    return o


def main(sections, children, entry, doc="", argv=None):
    """Runs one section. `sections` map names to functions of (opts, report); `children` map
    names to functions of (opts) that a section runs in a child process (the transformers
    reference), without the OpenBLAS re-exec, the idle wait or the report."""
    from mlx_diffusiongemma.backends.cpu_memory import keep_freed_memory

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in children:
        maybe_reexec_with_openblas(argv, entry)
    opts = parse(argv, {**sections, **children}, doc)
    if opts.section in children:
        return children[opts.section](opts)
    keep_freed_memory()  # as load_model does: the MLX peers in this process share it
    rep = Report(opts.json)
    if opts.wait_idle and opts.section not in ("graph", "sudoku"):
        wait_idle(opts.wait_idle)
    meter = CpuMeter()
    t = time.perf_counter()
    sections[opts.section](opts, rep)
    share = meter.others_share()
    busy = "" if share is None else f"; other processes used {share:.1%} of the CPUs meanwhile"
    say(f"  ({time.perf_counter() - t:.0f} s wall{busy})")
    rep.save(opts.section + ":run", {"wall_s": time.perf_counter() - t, "others_cpu_share": share})
