"""Thin entry point: `python generate.py --model PATH --prompt "..."` (see mlx_diffusiongemma.generate)."""

import sys

from mlx_diffusiongemma.generate import main

if __name__ == "__main__":
    sys.exit(main())
