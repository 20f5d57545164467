"""Section `vision`: the vision tower at its full shape (27 layers, width 1152, head_dim 72), in
float32 on this machine: ms per 280-token image, ours beside the transformers reference (in a
child process, as in `peers`); the tower's weight bytes; and an image prompt's prefill at the mid
text shape (tower + encoder) beside a text prompt of the same length."""

import json
import os
import subprocess

from mlx_diffusiongemma.bench.common import GB, ROOT, GiB, say
from mlx_diffusiongemma.bench.shapes import MID_TEXT

from . import ENTRY
from .common import build_random_float, own_cpu_seconds, release, rss_bytes, timeit

# google/diffusiongemma-26B-A4B-it's vision_config (the facts file in the project's notes).
FULL_VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=72,
    patch_size=16,
    pooling_kernel_size=3,
    position_embedding_size=10240,
    standardize=True,
)
# 672 x 960 px: 42 x 60 patches of 16 px, exactly 280 soft tokens (the default budget).
IMAGE_HW = (672, 960)


def timed(fn, n):
    """(median wall seconds, CPU seconds of this process per call): on a shared machine the
    CPU seconds are the steadier figure of the work done."""
    cpu = own_cpu_seconds()
    wall = timeit(fn, n=n)
    return wall, (own_cpu_seconds() - cpu) / (n + 1)


def image_inputs(seed=0):
    import numpy as np

    from mlx_diffusiongemma.image_processor import ImageProcessor

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)
    return ImageProcessor()([image])


def tower_bytes(args, text_hidden=2816):
    """Parameters of the tower and embed_vision, and their bytes in bf16 (float32: twice)."""
    v = args
    attn = 4 * v.hidden_size * v.num_attention_heads * v.head_dim
    layer = attn + 3 * v.hidden_size * v.intermediate_size + 4 * v.hidden_size + 2 * v.head_dim
    n = (
        v.num_hidden_layers * layer
        + 3 * v.patch_size**2 * v.hidden_size
        + 2 * v.position_embedding_size * v.hidden_size
        + 2 * v.hidden_size
        + v.hidden_size * text_hidden
    )
    return n, 2 * n


def random_tower(args, text_hidden):
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlx_diffusiongemma.vision import VisionEmbedder, VisionTower

    tower, embed = VisionTower(args), VisionEmbedder(args, text_hidden)
    for part in [tower.patch_embedder, *tower.encoder.layers, embed]:
        part.update(tree_map(lambda a: a * 1.0, part.parameters()))
        mx.eval(part.parameters())
    tower.std_bias, tower.std_scale = mx.zeros((args.hidden_size,)), mx.ones((args.hidden_size,))
    return tower, embed


def run_reference_child(repeat, layers):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["DG_BENCH_REEXEC"] = "1"
    cmd = [*ENTRY, "_vision_reference", "--repeat", str(repeat), "--layers", str(layers)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith("JSON "):
            return json.loads(line[5:])
    return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]}


def reference_main(opts):
    """Child: transformers' Gemma4VisionModel at the full shape, float32, one image per call."""
    import torch
    import transformers
    from transformers import AutoModel
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    torch.manual_seed(0)
    shape = dict(FULL_VISION, num_hidden_layers=opts.layers or FULL_VISION["num_hidden_layers"])
    model = AutoModel.from_config(Gemma4VisionConfig(**shape)).eval()
    with torch.no_grad():
        model.std_bias.zero_()
        model.std_scale.fill_(1.0)
    p = image_inputs()
    pv, pos = torch.tensor(p.pixel_values), torch.tensor(p.image_position_ids)

    def run():
        with torch.no_grad():
            model(pixel_values=pv, pixel_position_ids=pos)

    s, cpu = timed(run, opts.repeat)
    res = dict(
        version=transformers.__version__,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        ms_per_image=1000 * s,
        cpu_s_per_image=cpu,
        peak_gb=(rss_bytes("VmHWM") or 0) / GB,
    )
    print("JSON " + json.dumps(res), flush=True)


def section_vision(opts, rep):
    import mlx.core as mx

    from mlx_diffusiongemma.config import VisionArgs

    rep.header(
        "vision: the tower at full shape (float32, one 280-token image) and an image "
        "prompt's prefill"
    )
    n, bf16 = tower_bytes(VisionArgs(**FULL_VISION))
    layers = opts.layers or FULL_VISION["num_hidden_layers"]
    # --layers: fewer layers of the full width (a loaded machine); times scale with the layers
    vargs = VisionArgs(**dict(FULL_VISION, num_hidden_layers=layers))
    say(
        f"  tower + embed_vision: {n / 1e6:.1f} M parameters, {bf16 / GiB:.2f} GiB in bf16 "
        f"(kept unquantized by convert), {2 * bf16 / GiB:.2f} GiB in float32"
    )
    p = image_inputs()
    tokens = p.num_soft_tokens[0]
    pv, pos = mx.array(p.pixel_values), p.image_position_ids
    skip = set(opts.skip or ())
    figures = dict(params=n, bf16_bytes=bf16, image_tokens=tokens, patches=pv.shape[1])
    if "ours" not in skip:
        tower, embed = random_tower(vargs, 2816)

        def ours():
            mx.eval(embed(tower(pv, pos)))

        mx.reset_peak_memory()
        s, cpu = timed(ours, opts.repeat)
        peak = mx.get_peak_memory()
        say(
            f"  ours, {layers} layers: {1000 * s:.0f} ms per {tokens}-token image "
            f"({pv.shape[1]} patches; {cpu:.1f} CPU s), MLX peak {peak / GiB:.2f} GiB "
            "(weights included)"
        )
        figures.update(layers=layers, ours_ms=1000 * s, ours_cpu_s=cpu, ours_peak_gib=peak / GiB)
        del tower, embed
        release()
    if "reference" not in skip:
        ref = run_reference_child(opts.repeat, layers)
        figures["reference"] = ref
        if "error" in ref:
            say(f"  reference: failed ({ref['error']})")
        else:
            ratio = (
                f"; ours / reference: wall {figures['ours_ms'] / ref['ms_per_image']:.2f}, "
                f"CPU {figures['ours_cpu_s'] / ref['cpu_s_per_image']:.2f}"
                if "ours_ms" in figures
                else ""
            )
            say(
                f"  transformers {ref['version']} (torch {ref['torch']}, {ref['threads']} "
                f"threads), {layers} layers: {ref['ms_per_image']:.0f} ms per image "
                f"({ref['cpu_s_per_image']:.1f} CPU s), peak RSS {ref['peak_gb']:.2f} GB{ratio}"
            )
    if "prefill" not in skip:
        figures.update(encoder_prefill(opts, vargs, tokens))
    rep.save("vision", figures)


def encoder_prefill(opts, vargs, tokens):
    """The encoder's part of an image prompt's prefill at the mid text shape, over
    [BOS, 20 text, <|image>, 280 image tokens, <image|>, 20 text] with the image block rule,
    beside a text prompt of the same length. The soft tokens are random (the tower's time is
    measured above; values do not change the speed)."""
    import mlx.core as mx

    from mlx_diffusiongemma.bench.models import make_args

    args = make_args(MID_TEXT)
    V = args.vocab_size
    args.boi_token_id, args.image_token_id, args.eoi_token_id = V - 3, V - 2, V - 1
    model = build_random_float(args, mx.float32, verbose=False)
    text = list(range(3, 23))
    block = [args.boi_token_id] + [args.image_token_id] * tokens + [args.eoi_token_id]
    ids = [2] + text + block + text
    plain = mx.array([[2] + list(range(3, 3 + len(ids) - 1))], dtype=mx.int32)
    prompt = mx.array([ids], dtype=mx.int32)
    feats = mx.random.normal((tokens, args.hidden_size), key=mx.random.key(0))
    mx.eval(feats)

    def image_prefill():
        model.encode(prompt, model.make_cache(), vision={args.image_token_id: feats})

    def text_prefill():
        model.encode(plain, model.make_cache())

    s_img, c_img = timed(image_prefill, opts.repeat)
    s_txt, c_txt = timed(text_prefill, opts.repeat)
    say(
        f"  mid-shape encoder over a {len(ids)}-token prompt with one image (soft tokens given): "
        f"{1000 * s_img:.0f} ms ({c_img:.2f} CPU s); the same length of text: "
        f"{1000 * s_txt:.0f} ms ({c_txt:.2f} CPU s); an image prompt's prefill = the tower + this"
    )
    return dict(
        prefill_tokens=len(ids),
        image_encoder_ms=1000 * s_img,
        image_encoder_cpu_s=c_img,
        text_encoder_ms=1000 * s_txt,
        text_encoder_cpu_s=c_txt,
    )
