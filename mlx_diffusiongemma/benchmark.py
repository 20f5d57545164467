"""`python -m mlx_diffusiongemma.benchmark SECTION`: the benchmarks of issue 6. The code, and how
to run it, is in the package mlx_diffusiongemma/bench/."""

from .bench.cli import main

if __name__ == "__main__":
    main()
