"""`python -m mlx_diffusiongemma.fuse`: adapters fused into the base weights, written as a
checkpoint folder that `load` reads (mlx_lm.fuse's flags and meaning)."""

import argparse
from pathlib import Path

from mlx.utils import tree_unflatten

from .cli import one_line_errors


def parser():
    p = argparse.ArgumentParser(
        prog="mlx_diffusiongemma.fuse", description="Fuse fine-tuned adapters into the base model."
    )
    p.add_argument("--model", required=True, help="base model: local folder or Hugging Face id")
    p.add_argument(
        "--adapter-path",
        default="adapters",
        help="folder with adapters.safetensors and adapter_config.json (default: adapters)",
    )
    p.add_argument(
        "--save-path", default="fused_model", help="folder to write (default: fused_model)"
    )
    p.add_argument("--dequantize", action="store_true", help="write unquantized weights")
    p.add_argument("--force", action="store_true", help="replace an existing --save-path")
    return p


def fuse(model_path, adapter_path, save_path, dequantize=False, force=False):
    from mlx_lm.utils import dequantize_model

    from .convert import check_destination
    from .loader import load_model, read_config, resolve_path
    from .save import save_model
    from .tuner.adapters import load_adapters

    src = resolve_path(model_path, tokenizer=True)
    check_destination(Path(save_path).expanduser().absolute(), force)
    model = load_model(src)
    load_adapters(model, adapter_path)
    fused = [
        (n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    config = dict(read_config(src))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    return save_model(model, config, save_path, source=src)


def main(argv=None):
    a = parser().parse_args(argv)
    with one_line_errors():
        out = fuse(a.model, a.adapter_path, a.save_path, a.dequantize, a.force)
        print(f"Wrote {out}")


if __name__ == "__main__":
    main()
