"""The checkpointed LoRA step at the mid shape with mlx-lm's `grad_checkpoint` in place of ours
(tuner/checkpoint.py), to compare the two: `python -m benchmarks.harness lora --part speed
--grad-checkpoint` with the trainer's checkpoint swapped. From the repo root:

    python benchmarks/logs/lora_ckpt/ckspeed.py {ordered,mlx-lm} [benchmark flags, e.g. --json F]
"""

import sys
from pathlib import Path

import mlx_lm.tuner.trainer

import mlx_diffusiongemma.tuner.trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks.harness
from benchmarks.harness.__main__ import CHILDREN, SECTIONS  # noqa: E402
from benchmarks.harness.cli import main  # noqa: E402


def mlx_lm_checkpoint(layer):
    """mlx-lm's grad_checkpoint, with the undo function ours returns."""
    cls = type(layer)
    forward = cls.__call__
    mlx_lm.tuner.trainer.grad_checkpoint(layer)

    def undo():
        cls.__call__ = forward

    return undo


if __name__ == "__main__":
    variant, flags = sys.argv[1], sys.argv[2:]
    if variant not in ("ordered", "mlx-lm"):
        sys.exit(f"ckspeed.py: the variant is ordered or mlx-lm, not {variant!r}")
    if variant == "mlx-lm":
        mlx_diffusiongemma.tuner.trainer.grad_checkpoint = mlx_lm_checkpoint
    argv = ["lora", "--part", "speed", "--grad-checkpoint", "--repeat", "4"]
    argv += flags[len(argv) :] if flags[: len(argv)] == argv else flags  # re-executed: as given
    # re-executed with OpenBLAS: the same variant
    main(SECTIONS, CHILDREN, [sys.executable, __file__, variant], argv=argv)
