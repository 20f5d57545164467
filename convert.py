"""Hugging Face DiffusionGemma -> MLX: `python convert.py --hf-path PATH_OR_HUB_ID --mlx-path OUT [-q]`."""

import sys

from mlx_diffusiongemma.convert import main

if __name__ == "__main__":
    sys.exit(main())
