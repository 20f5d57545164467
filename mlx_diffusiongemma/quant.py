"""Quantization settings shared by the converter, the loader and the benchmarks.

The `mixed` recipe is the one of the mlx-community DiffusionGemma repos (made by mlx-vlm):
embeddings, every attention projection, the dense MLP and the router at 8 bits (affine,
group 64); the experts and everything else quantizable (the self-conditioning MLP) at the
requested bits and mode. Norms, scales and layer scalars are never quantized.
"""

from typing import Optional

import mlx.core as mx

from .checks import check_int

# (group_size, bits) when not given, as mlx-lm and mlx-vlm choose them.
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}
RECIPES = ("mixed", "uniform")
HIGH_PRECISION = {"group_size": 64, "bits": 8, "mode": "affine"}


class QuantizationError(ValueError):
    """Quantization settings that MLX cannot apply."""


def resolve(
    bits: Optional[int] = None, group_size: Optional[int] = None, mode: str = "affine"
) -> dict:
    """{"group_size", "bits", "mode"} with the mode's defaults filled in where not given (None;
    a zero is refused, never replaced), after checking with `mx.quantize` itself that this MLX
    build supports the combination."""
    if not isinstance(mode, str) or mode not in MODE_DEFAULTS:
        raise QuantizationError(
            f"unknown quantization mode {mode!r} (choose from {', '.join(MODE_DEFAULTS)})"
        )
    dg, db = MODE_DEFAULTS[mode]
    if group_size is not None:
        check_int("quantization group size", group_size, hi=1 << 16, exc=QuantizationError)
    if bits is not None:
        check_int("quantization bits", bits, hi=64, exc=QuantizationError)
    gs = dg if group_size is None else group_size
    b = db if bits is None else bits
    try:
        mx.eval(mx.quantize(mx.zeros((2, 4 * gs)), gs, b, mode=mode))
    except (ValueError, RuntimeError) as e:
        reason = str(e).replace("[quantize] ", "")
        raise QuantizationError(
            f"{mode} quantization with {b} bits and group size {gs} is not supported by "
            f"MLX {mx.__version__}: {reason}"
        ) from None
    return {"group_size": gs, "bits": b, "mode": mode}


def is_high_precision(path: str) -> bool:
    """mlx-vlm's DiffusionGemma quant_predicate: the modules kept at 8 bits."""
    return (
        path.endswith(("embed_tokens", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
        or ".self_attn." in path
        or "router" in path
    )


def module_params(path: str, in_dims: int, default: dict, recipe: str = "mixed") -> Optional[dict]:
    """Quantization of one quantizable module (Linear, Embedding, SwitchLinear) whose weight's
    last dimension is `in_dims`: a params dict, or None to keep it unquantized (its input size
    is not a multiple of the group size, as mlx-lm does)."""
    if recipe not in RECIPES:
        raise QuantizationError(
            f"unknown quantization recipe {recipe!r} (choose from {', '.join(RECIPES)})"
        )
    params = (
        dict(HIGH_PRECISION) if recipe == "mixed" and is_high_precision(path) else dict(default)
    )
    return params if in_dims % params["group_size"] == 0 else None


def predicate(default: dict, recipe: str = "mixed"):
    """A `class_predicate` for `nn.quantize` applying the recipe to an in-memory model, e.g.
    `nn.quantize(model, **default, class_predicate=predicate(default))`."""

    def pred(path, module):
        if not hasattr(module, "to_quantized") or path.startswith("model.encoder.vision"):
            return False
        return module_params(path, module.weight.shape[-1], default, recipe) or False

    return pred


def config_block(default: dict, overrides: dict) -> dict:
    """The mlx-lm `quantization` block: top-level defaults plus per-module overrides."""
    block = dict(default)
    block.update({k: overrides[k] for k in sorted(overrides)})
    return block
