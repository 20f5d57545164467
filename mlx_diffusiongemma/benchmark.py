"""`python -m mlx_diffusiongemma.benchmark SECTION`: what the model costs on this machine. The
code, and how to run it, is in the package mlx_diffusiongemma/bench/."""

from .bench.cli import main

if __name__ == "__main__":
    main()
