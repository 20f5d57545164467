"""Model arguments at the benchmark shapes, exact weight bytes per quantization recipe, and
random-weight models built without materialising a full-shape float model."""

import math
import time

from .common import GiB, say
from .shapes import FULL_CANVAS, FULL_TEXT


def text_config(text, canvas_length=FULL_CANVAS):
    return {
        "model_type": "diffusion_gemma",
        "text_config": dict(text),
        "canvas_length": canvas_length,
    }


def make_args(text=FULL_TEXT, layers=None, canvas_length=FULL_CANVAS, **overrides):
    from ..config import ModelArgs

    t = dict(text, **overrides)
    if layers is not None:
        t["num_hidden_layers"] = layers
    return ModelArgs.from_config(text_config(t, canvas_length))


def layer_counts(args):
    s = sum(args.is_sliding(i) for i in range(args.num_hidden_layers))
    return s, args.num_hidden_layers - s


# ---------------------------------------------------------------------------------------------
# quantization recipes (the project's, or the same rule locally) and the bytes they give
# ---------------------------------------------------------------------------------------------
def _quant():
    try:
        from .. import quant

        return quant
    except ImportError:
        return None


def is_high_precision(path):
    q = _quant()
    if q is not None:
        return q.is_high_precision(path)
    return (
        path.endswith(("embed_tokens", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
        or ".self_attn." in path
        or "router" in path
    )


def module_params(path, in_dims, default, recipe):
    """Quantization of one quantizable module (the project's recipe, or the same rule locally)."""
    q = _quant()
    if q is not None:
        return q.module_params(path, in_dims, default, recipe)
    params = (
        dict(group_size=64, bits=8, mode="affine")
        if recipe == "mixed" and is_high_precision(path)
        else dict(default)
    )
    return params if in_dims % params["group_size"] == 0 else None


def default_quant(bits=4, group_size=64, mode="affine"):
    q = _quant()
    if q is not None:
        return q.resolve(bits, group_size, mode)
    return {"group_size": group_size, "bits": bits, "mode": mode}


def quantized_bytes(numel, params, float_bytes=2):
    """Packed weights plus per-group scales (and biases for affine) in bf16 (mx: uint8 scales)."""
    groups = numel // params["group_size"]
    mode = params.get("mode", "affine")
    packed = numel * params["bits"] // 8
    if mode == "affine":
        return packed + 2 * groups * float_bytes
    return packed + groups * 1  # mxfp4 / mxfp8 / nvfp4: one 8-bit scale per group


def category(path):
    if "embed_tokens" in path or path.startswith("lm_head"):
        return "embeddings"
    if "self_conditioning" in path:
        return "self-conditioning MLP"
    if ".self_attn." in path:
        return "attention"
    if ".experts." in path:
        return "experts"
    if ".router." in path:
        return "router"
    if ".mlp." in path:
        return "dense MLP"
    return "norms, scales"


def model_layout(args):
    """(quantizable modules {path: weight shape}, other parameters {path: shape}) of the text
    model, read from a lazily built Model: nothing is allocated."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from ..model import Model

    model = Model(args)
    quantizable = {}
    for path, m in model.named_modules():
        if isinstance(m, nn.Module) and hasattr(m, "to_quantized") and "weight" in m:
            quantizable[path] = tuple(m.weight.shape)
    others = {}
    for k, v in tree_flatten(model.parameters()):
        owner, _, leaf = k.rpartition(".")
        if owner in quantizable and leaf == "weight":
            continue
        others[k] = tuple(v.shape)
    del model
    return quantizable, others


def recipe_bytes(args, recipe):
    """Exact bytes of every tensor of the text model under a recipe: ('bf16', None) or
    (recipe name, default quantization params). Returns (total, {category: bytes})."""
    quantizable, others = model_layout(args)
    name, default = recipe

    def sizes():
        for path, shape in quantizable.items():
            n = math.prod(shape)
            params = None if default is None else module_params(path, shape[-1], default, name)
            yield path, 2 * n if params is None else quantized_bytes(n, params)
        for path, shape in others.items():
            yield path, 2 * math.prod(shape)

    cats = {}
    total = 0
    for path, b in sizes():
        cats[category(path)] = cats.get(category(path), 0) + b
        total += b
    return total, cats


RECIPES = [
    (
        "mixed 4-bit (default: 8-bit embeddings/attention/dense MLP/router, 4-bit experts)",
        "mixed",
        4,
    ),
    ("uniform 4-bit", "uniform", 4),
    ("8-bit", "uniform", 8),
    ("bf16", None, None),
]


def all_recipe_bytes(args):
    out = {}
    for label, name, bits in RECIPES:
        rec = ("bf16", None) if name is None else (name, default_quant(bits))
        out[label] = recipe_bytes(args, rec)
    return out


# ---------------------------------------------------------------------------------------------
# random-weight models
# ---------------------------------------------------------------------------------------------
def quantize_structure(model, default, recipe="mixed"):
    """Swaps `model`'s modules for quantized ones as `recipe` quantizes them (each module its
    own bits and group size), without evaluating anything."""
    import mlx.nn as nn

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or "weight" not in module:
            return False
        return module_params(path, module.weight.shape[-1], default, recipe) or False

    nn.quantize(
        model,
        group_size=default["group_size"],
        bits=default["bits"],
        mode=default["mode"],
        class_predicate=predicate,
    )


def build_random_quantized(args, default, recipe="mixed", dtype=None, seed=0, verbose=True):
    """A Model with random weights, quantized with `recipe`, built module by module: the float
    weights of `Model(args)` stay lazy and are never evaluated; each quantized module gets random
    packed weights and random scales (bf16) directly, and is evaluated before the next one."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..model import Model

    dtype = dtype or mx.bfloat16
    model = Model(args)
    quantize_structure(model, default, recipe)
    key = mx.random.key(seed)
    quantized = [(p, m) for p, m in model.named_modules() if "scales" in m and "weight" in m]
    t0 = time.perf_counter()
    for n, (path, m) in enumerate(quantized):
        key, k1, k2 = mx.random.split(key, 3)
        w = m["weight"]
        m.weight = mx.random.randint(0, 2**31 - 1, w.shape, dtype=mx.int32, key=k1).view(w.dtype)
        s = m["scales"]
        if mx.issubdtype(s.dtype, mx.floating):
            scales = (mx.random.uniform(shape=s.shape, key=k2) * 2e-3 + 1e-3).astype(dtype)
        else:
            scales = mx.random.randint(100, 130, s.shape, key=k2).astype(s.dtype)
        m.scales = scales
        if "biases" in m and m["biases"] is not None:
            m.biases = (-8.0 * scales).astype(dtype)
        mx.eval(m.parameters())
        if verbose and (n % 40 == 0 or n == len(quantized) - 1):
            say(
                f"  quantized {n + 1}/{len(quantized)} modules ({path}), "
                f"active {mx.get_active_memory() / GiB:.2f} GiB, {time.perf_counter() - t0:.0f} s"
            )
    # everything else (norms, router scales, layer scalars): cast to the activation dtype
    rest = [
        (k, v)
        for k, v in tree_flatten(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".scales", ".biases"))
    ]
    model.load_weights([(k, v.astype(dtype)) for k, v in rest], strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model


def build_random_float(args, dtype, verbose=True):
    """A Model with random float weights in `dtype`, evaluated one layer at a time."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from ..model import Model

    model = Model(args)
    parts = [model.model.decoder.embed_tokens, model.model.decoder.self_conditioning, *model.layers]
    for part in parts:
        part.update(tree_map(lambda a: (a * 1.0).astype(dtype), part.parameters()))
        mx.eval(part.parameters())
    rest = [(k, v.astype(dtype)) for k, v in tree_flatten(model.parameters()) if v.dtype != dtype]
    if rest:
        model.load_weights(rest, strict=False)
    mx.eval(model.parameters())
    model.eval()
    if verbose:
        say(f"  built: {param_bytes(model) / GiB:.2f} GiB of {dtype} weights")
    return model


def build_shared_float(args, dtype):
    """A Model with random float weights in `dtype` whose layers of one attention type all hold
    the first such layer's arrays: what a step keeps per layer can then be measured at the real
    depth in the memory of two layers (frozen weights are only read; a layer's activations,
    gradients and adapters are its own whatever weights it reads)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from ..model import Model

    model = Model(args)
    first = {}
    for part in [model.model.decoder.embed_tokens, model.model.decoder.self_conditioning]:
        part.update(tree_map(lambda a: (a * 1.0).astype(dtype), part.parameters()))
    for i, layer in enumerate(model.layers):
        kind = args.layer_types[i]
        if kind in first:
            layer.update(first[kind].parameters())
        else:
            layer.update(tree_map(lambda a: (a * 1.0).astype(dtype), layer.parameters()))
            first[kind] = layer
        mx.eval(layer.parameters())
    model.update(tree_map(lambda a: a if a.dtype == dtype else a.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    model.eval()
    return model


def param_bytes(model):
    """Bytes of the model's parameters, an array held in several places counted once."""
    from mlx.utils import tree_flatten

    return sum({id(v): v.nbytes for _, v in tree_flatten(model.parameters())}.values())
