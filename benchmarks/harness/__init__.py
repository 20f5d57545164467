"""The project's own measuring harness (not installed with the package): shape studies, LoRA
memory, where a step's time goes, how the graph builds, the server under load, the Sudoku demo,
and comparisons with the transformers reference, mlx-vlm and mlx-lm. Run from a checkout's root:

    python -m benchmarks.harness build      # full shape, mixed 4-bit, built with random weights
    python -m benchmarks.harness fullwidth  # full width at reduced depth: activation peak, step
                                            # time, sampler share; extrapolated to 30 layers
    python -m benchmarks.harness gpu-step   # one full-shape step on a GPU, in parts
    python -m benchmarks.harness lora       # LoRA step: peak memory at full width (extrapolated,
                                            # and at 30 layers sharing weights); it/s at mid
    python -m benchmarks.harness peers      # mid shape: ours vs transformers, mlx-vlm, mlx-lm AR
    python -m benchmarks.harness profile    # mid shape: where our decoder step spends its time
    python -m benchmarks.harness graph      # full shape: Python time to build one step's graph
    python -m benchmarks.harness serve      # the server: N requests at once vs in turn
    python -m benchmarks.harness vision     # the vision tower at full shape vs the reference,
                                            # its weight bytes, an image prompt's prefill
    python -m benchmarks.harness sudoku     # the trained demo on held-out puzzles

What a user measures on their own machine is the package's command, `python -m
mlx_diffusiongemma.benchmark --model M` (and `weights`, `gpu`: the 26B without downloading it).
Every section prints the package's header line (date, machine, MLX version, device, BLAS, git
commit) and, with `--json FILE`, appends its figures as JSON lines. On Linux the harness re-runs
itself with OpenBLAS preloaded when installed (`--no-openblas`: the MLX wheel's BLAS); the
transformers reference always runs in a child process without that preload (OpenBLAS interposed
under PyTorch's MKL makes it ~8x slower).
"""

import sys

# the command every re-execution and reference child process runs (from the checkout's root)
ENTRY = [sys.executable, "-m", "benchmarks.harness"]
