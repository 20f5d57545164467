"""Which layers are adapted, on mlx-lm's LoRA/DoRA layers, and loading adapters back.

By default every linear of every adapted layer — attention, dense MLP, router and the experts
(mlx-lm's LoRASwitchLinear; DoRA has no expert layer in mlx-lm, so DoRA leaves the experts
alone) — and the self-conditioning MLP, which sits outside the layers. The keys are written
into the adapter config, so mlx-lm's `load_adapters` rebuilds exactly these layers.
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

SELF_CONDITIONING = "model.decoder.self_conditioning"


def default_keys(model, dora: bool) -> list:
    """Layer-relative names of the adaptable linears, plus the self-conditioning MLP's
    (absolute names, which mlx-lm's linear_to_lora_layers matches at the model level)."""
    kinds = (nn.Linear, nn.QuantizedLinear) + (
        () if dora else (SwitchLinear, QuantizedSwitchLinear)
    )
    keys = sorted({k for k, m in model.layers[0].named_modules() if isinstance(m, kinds)})
    return keys + [f"{SELF_CONDITIONING}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def prepare(model, fine_tune_type: str, num_layers: int, lora_parameters: dict) -> dict:
    """Freezes the model and makes trainable what the fine-tune type trains; returns the
    lora_parameters with their keys filled in (for adapter_config.json)."""
    n = len(model.layers)
    if num_layers != -1 and not 1 <= num_layers <= n:
        raise ValueError(f"--num-layers must be -1 (all) or 1..{n}, not {num_layers}")
    model.freeze()
    if fine_tune_type == "full":
        if any(hasattr(m, "scales") for _, m in model.named_modules()):
            raise ValueError(
                "full fine-tuning needs an unquantized model (use lora or dora for a quantized one)"
            )
        if num_layers in (-1, n):
            model.unfreeze()  # every text weight, embeddings and self-conditioning included
            # The objective reads text only: the vision tower gets no gradient, and weight
            # decay alone would wear it down.
            for name in ("vision_tower", "embed_vision"):
                if name in model.model.encoder:
                    model.model.encoder[name].freeze()
        else:
            for layer in model.layers[-num_layers:]:
                layer.unfreeze()
        return lora_parameters
    if fine_tune_type not in ("lora", "dora"):
        raise ValueError(f"unknown fine-tune type {fine_tune_type!r} (lora, dora or full)")
    params = dict(lora_parameters)
    for key, ok in (
        ("rank", lambda v: isinstance(v, int) and v >= 1),
        ("scale", lambda v: isinstance(v, (int, float)) and mx.isfinite(mx.array(v)).item()),
        ("dropout", lambda v: isinstance(v, (int, float)) and 0 <= v < 1),
    ):
        if key not in params or not ok(params[key]):
            raise ValueError(
                f"lora_parameters.{key} is missing or out of range: {params.get(key)!r}"
            )
    if params.get("keys") is None:
        params["keys"] = default_keys(model, fine_tune_type == "dora")
    linear_to_lora_layers(model, num_layers, params, use_dora=fine_tune_type == "dora")
    return params


def load_adapters(model, adapter_path):
    """mlx-lm's `load_adapters`, its multi-line complaint about tensors that do not fit made
    one line."""
    folder = Path(adapter_path)
    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"adapter path {folder}: {name} is missing")
    try:
        return mlx_lm_load_adapters(model, str(adapter_path))
    except ValueError as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        more = f" (+{len(lines) - 2} more)" if len(lines) > 2 else ""
        raise ValueError(
            f"adapter {adapter_path} does not fit this model: "
            + (lines[1] if len(lines) > 1 else lines[0])
            + more
        ) from None
    except (KeyError, AttributeError) as e:
        raise ValueError(
            f"adapter {adapter_path}: adapter_config.json lacks a setting ({e})"
        ) from None
