"""The project's own measuring harness (not installed with the package): where a step's time
goes, how the graph builds, the server under load, and comparisons with the transformers
reference, mlx-vlm and mlx-lm. Run from a checkout's root:

    python -m benchmarks.harness peers    # mid shape: ours vs transformers, mlx-vlm, mlx-lm AR
    python -m benchmarks.harness profile  # mid shape: where our decoder step spends its time
    python -m benchmarks.harness graph    # full shape: Python time to build one step's graph
    python -m benchmarks.harness serve    # the server: N requests at once vs in turn
    python -m benchmarks.harness vision   # the vision tower at full shape vs the reference,
                                          # its weight bytes, an image prompt's prefill

The arguments, the machine header, the OpenBLAS re-exec and the JSON lines are those of
`python -m mlx_diffusiongemma.benchmark` (mlx_diffusiongemma/bench/), whose sections measure
what the model costs on the user's machine.
"""

import sys

# the command every re-execution and reference child process runs (from the checkout's root)
ENTRY = [sys.executable, "-m", "benchmarks.harness"]
