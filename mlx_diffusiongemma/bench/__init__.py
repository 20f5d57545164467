"""Benchmarks for mlx-diffusiongemma (the measurement side of GitHub issue 6). Prints figures;
asserts nothing.

    python -m mlx_diffusiongemma.benchmark weights    # resident weight bytes per recipe, full shape (analytic)
    python -m mlx_diffusiongemma.benchmark build      # builds the full-shape model, mixed 4-bit, and measures it
    python -m mlx_diffusiongemma.benchmark fullwidth  # full width at reduced depth: activation peak, step time,
                                                      # sampler share at the real vocabulary; extrapolated to 30 layers
    python -m mlx_diffusiongemma.benchmark peers      # mid shape: ours vs transformers vs mlx-vlm, and mlx-lm AR
    python -m mlx_diffusiongemma.benchmark profile    # mid shape: where our decoder step spends its time
    python -m mlx_diffusiongemma.benchmark gpu        # full shape on a GPU (CUDA or Metal): prefill tok/s,
                                                      # decoder step latency, decode tok/s at 16 fixed steps
    python -m mlx_diffusiongemma.benchmark graph      # full shape: Python time to build one step's graph
    python -m mlx_diffusiongemma.benchmark serve      # the server: N requests at once vs in turn
    python -m mlx_diffusiongemma.benchmark lora       # LoRA training step: peak memory at full width, extrapolated
                                                      # to 30 layers (with and without grad checkpointing); it/s at mid
    python -m mlx_diffusiongemma.benchmark vision     # the vision tower at full shape vs the reference,
                                                      # its weight bytes, an image prompt's prefill

Every section prints a header (date, machine, MLX version, device, BLAS, git commit). `--json FILE`
appends each section's figures as one JSON line.

On Linux the MLX wheel's own CPU BLAS is ~20x slower than OpenBLAS for float32 matmuls, so the
command re-executes itself with OpenBLAS in LD_PRELOAD when the library is installed
(`apt-get install libopenblas0-pthread`) and not already loaded; `--no-openblas` keeps the
wheel's BLAS. The transformers reference always runs in a child process without that preload:
interposing OpenBLAS under PyTorch's MKL makes it ~8x slower.

Modules: cli (arguments, dispatch), common (process setup, machine header, timing, JSON lines, the
mid-size checkpoint), shapes (model shapes, targets), models (weight bytes per recipe, random
full-shape models), step (one denoising step timed in parts), fullshape (weights, build,
fullwidth, gpu), peers (ours vs the reference, mlx-vlm and mlx-lm AR), profile, graph, serve,
lora (LoRA step memory and speed), sudoku, vision.
"""
