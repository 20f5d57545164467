"""Model arguments at the benchmark shapes, exact weight bytes per quantization recipe, and a
random-weight quantized model built without materialising a full-shape float model."""

import math
import time

from .. import quant
from .common import GiB, say
from .shapes import FULL_CANVAS, FULL_TEXT

RECIPES = [  # (label, recipe, bits); recipe None: bf16
    (
        "mixed 4-bit (default: 8-bit embeddings/attention/dense MLP/router, 4-bit experts)",
        "mixed",
        4,
    ),
    ("uniform 4-bit", "uniform", 4),
    ("8-bit", "uniform", 8),
    ("bf16", None, None),
]


def make_args(text=FULL_TEXT, layers=None, canvas_length=FULL_CANVAS, **overrides):
    from ..config import ModelArgs

    t = dict(text, **overrides)
    if layers is not None:
        t["num_hidden_layers"] = layers
    config = {"model_type": "diffusion_gemma", "text_config": t, "canvas_length": canvas_length}
    return ModelArgs.from_config(config)


def default_quant(bits=4):
    return quant.resolve(bits)


def quantized_bytes(numel, params, float_bytes=2):
    """Packed weights plus per-group scales (and biases for affine) in bf16 (mx: uint8 scales)."""
    groups = numel // params["group_size"]
    packed = numel * params["bits"] // 8
    if params.get("mode", "affine") == "affine":
        return packed + 2 * groups * float_bytes
    return packed + groups  # mxfp4 / mxfp8 / nvfp4: one 8-bit scale per group


CATEGORIES = (  # (a substring of the parameter path, the part of the model), first match wins
    ("embed_tokens", "embeddings"),
    ("lm_head", "embeddings"),
    ("self_conditioning", "self-conditioning MLP"),
    (".self_attn.", "attention"),
    (".experts.", "experts"),
    (".router.", "router"),
    (".mlp.", "dense MLP"),
    ("", "norms, scales"),
)
PARTS = ("experts", "embeddings", "attention", "dense MLP", "router", "self-conditioning MLP")


def category(path):
    return next(name for key, name in CATEGORIES if key in path)


def model_layout(args):
    """(quantizable modules {path: weight shape}, other parameters {path: shape}) of the text
    model, read from a lazily built Model: nothing is allocated."""
    from mlx.utils import tree_flatten

    from ..model import Model

    model = Model(args)
    quantizable = {
        path: tuple(m.weight.shape)
        for path, m in model.named_modules()
        if hasattr(m, "to_quantized") and "weight" in m
    }
    others = {}
    for k, v in tree_flatten(model.parameters()):
        owner, _, leaf = k.rpartition(".")
        if not (owner in quantizable and leaf == "weight"):
            others[k] = tuple(v.shape)
    return quantizable, others


def recipe_bytes(args, recipe, bits):
    """Exact bytes of every tensor of the text model quantized by `recipe` ("mixed",
    "uniform"; None: bf16) at `bits`. Returns (total, {category: bytes})."""
    quantizable, others = model_layout(args)
    default = None if recipe is None else default_quant(bits)
    cats = dict.fromkeys((*PARTS, "norms, scales"), 0)
    for path, shape in [*quantizable.items(), *others.items()]:
        n = math.prod(shape)
        params = None
        if path in quantizable and default is not None:
            params = quant.module_params(path, shape[-1], default, recipe)
        b = 2 * n if params is None else quantized_bytes(n, params)
        cats[category(path)] += b
    return sum(cats.values()), cats


def quantize_structure(model, default, recipe="mixed"):
    """Swaps `model`'s modules for quantized ones as `recipe` quantizes them (each module its
    own bits and group size), without evaluating anything."""
    import mlx.nn as nn

    nn.quantize(model, **default, class_predicate=quant.predicate(default, recipe))


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
        w, s = m["weight"], m["scales"]
        m.weight = mx.random.randint(0, 2**31 - 1, w.shape, dtype=mx.int32, key=k1).view(w.dtype)
        if mx.issubdtype(s.dtype, mx.floating):
            m.scales = (mx.random.uniform(shape=s.shape, key=k2) * 2e-3 + 1e-3).astype(dtype)
        else:
            m.scales = mx.random.randint(100, 130, s.shape, key=k2).astype(s.dtype)
        if m.get("biases") is not None:
            m.biases = (-8.0 * m.scales).astype(dtype)
        mx.eval(m.parameters())
        if verbose and (n % 40 == 0 or n == len(quantized) - 1):
            say(
                f"  quantized {n + 1}/{len(quantized)} modules ({path}), "
                f"active {mx.get_active_memory() / GiB:.2f} GiB, {time.perf_counter() - t0:.0f} s"
            )
    # everything else (norms, router scales, layer scalars): cast to the activation dtype
    rest = [
        (k, v.astype(dtype))
        for k, v in tree_flatten(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".scales", ".biases"))
    ]
    model.load_weights(rest, strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model


def param_bytes(model):
    """Bytes of the model's parameters, an array held in several places counted once."""
    from mlx.utils import tree_flatten

    return sum({id(v): v.nbytes for _, v in tree_flatten(model.parameters())}.values())


def gpu_section_args(rep, title: str, shape: str, layers, vocab, allow_cpu: bool):
    """The `gpu` sections' start: the GPU made MLX's default device and the backend selected,
    and the model args at `shape` (`layers`, `vocab` overriding it when given). None, with the
    header `title` and a line saying why, when MLX sees no GPU and `allow_cpu` is off (then
    `--allow-cpu --shape tiny` runs the same code as a dry run on the CPU)."""
    import mlx.core as mx

    from .. import backends
    from .common import gpu_name
    from .shapes import SHAPES

    if gpu_name() is None and not allow_cpu:
        rep.header(title)
        say(
            "  skipped: no GPU (MLX reports neither CUDA nor Metal). `--allow-cpu --shape tiny` "
            "runs the same code on this CPU on a small model (a dry run)."
        )
        return None
    if gpu_name() is not None:
        mx.set_default_device(mx.gpu)
    backends.select()
    return make_args(SHAPES[shape], layers=layers, **({"vocab_size": vocab} if vocab else {}))
