"""What `python -m mlx_diffusiongemma.benchmark` (benchmark.py) builds on, and the project's harness
(benchmarks/harness/, in a checkout) with it: common (the OpenBLAS re-exec, the machine header,
JSON lines), shapes (the model shapes and targets), models (weight bytes per quantization recipe,
random full-shape quantized models)."""
