"""What the model costs on this machine: memory, speed, and whether the demo solves its task.
Prints figures; asserts nothing.

    python -m mlx_diffusiongemma.benchmark weights    # resident weight bytes per recipe, full shape (analytic)
    python -m mlx_diffusiongemma.benchmark build      # builds the full-shape model, mixed 4-bit, and measures it
    python -m mlx_diffusiongemma.benchmark fullwidth  # full width at reduced depth: activation peak, step time,
                                                      # sampler share at the real vocabulary; extrapolated to 30 layers
    python -m mlx_diffusiongemma.benchmark gpu        # full shape on a GPU (CUDA or Metal): prefill tok/s,
                                                      # decoder step latency, decode tok/s at 16 fixed steps
    python -m mlx_diffusiongemma.benchmark lora       # LoRA training step: peak memory at full width, extrapolated
                                                      # to 30 layers (with and without grad checkpointing); it/s at mid
    python -m mlx_diffusiongemma.benchmark sudoku     # the trained demo on held-out puzzles

The project's own measuring harness (peers, profile, graph, serve, vision) lives outside the
package, in benchmarks/harness/ of a checkout, and shares this command's arguments and header.

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
fullwidth, gpu), lora (LoRA step memory and speed), sudoku.
"""
