"""Benchmarks for mlx-diffusiongemma (the measurement side of GitHub issue 6). Prints figures;
asserts nothing.

    python -m mlx_diffusiongemma.benchmark weights    # resident weight bytes per recipe, full shape (analytic)
    python -m mlx_diffusiongemma.benchmark build      # builds the full-shape model, mixed 4-bit, and measures it
    python -m mlx_diffusiongemma.benchmark fullwidth  # full width at reduced depth: activation peak, step time,
                                                      # sampler share at the real vocabulary; extrapolated to 30 layers
    python -m mlx_diffusiongemma.benchmark peers      # mid shape: ours vs transformers vs mlx-vlm, and mlx-lm AR
    python -m mlx_diffusiongemma.benchmark profile    # mid shape: where our decoder step spends its time
    python -m mlx_diffusiongemma.benchmark gpu        # full shape on a GPU (CUDA or Metal): prefill tok/s,
                                                      # decoder step latency, decode tok/s at 16 fixed steps

Every section prints a header (date, machine, MLX version, device, BLAS, git commit). `--json FILE`
appends each section's figures as one JSON line.

On Linux the MLX wheel's own CPU BLAS is ~20x slower than OpenBLAS for float32 matmuls, so the
command re-executes itself with OpenBLAS in LD_PRELOAD when the library is installed
(`apt-get install libopenblas0-pthread`) and not already loaded; `--no-openblas` keeps the
wheel's BLAS. The transformers reference always runs in a child process without that preload:
interposing OpenBLAS under PyTorch's MKL makes it ~8x slower.
"""

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPENBLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]
GB, GiB = 1e9, 2**30

# google/diffusiongemma-26B-A4B-it, text part (see the facts file in the project's shared notes).
FULL_TEXT = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
    num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024, num_experts=128,
    top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262144,
    final_logit_softcapping=30.0, rms_norm_eps=1e-6, use_bidirectional_attention="vision",
)
FULL_CANVAS = 256
# The mid-size peer checkpoint: full-model proportions at ~1/3 width, 6 layers (5 sliding + 1 full).
MID_TEXT = dict(
    vocab_size=32768, hidden_size=1024, intermediate_size=768, num_hidden_layers=6,
    num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=256,
    num_global_key_value_heads=1, sliding_window=1024, num_experts=64, top_k_experts=8,
    moe_intermediate_size=256, max_position_embeddings=8192,
)
# A small shape with the same structure, for dry runs of the GPU path on a CPU (`--shape tiny`).
TINY_TEXT = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=192, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
    num_global_key_value_heads=1, sliding_window=128, num_experts=16, top_k_experts=4,
    moe_intermediate_size=64, max_position_embeddings=8192,
)
SHAPES = {"full": FULL_TEXT, "mid": MID_TEXT, "tiny": TINY_TEXT}
# Targets of issue 6 and figures from peers (facts file).
TARGETS = dict(resident_4bit_gb=16.0, peak_4096_gb=18.0, sampler_share=0.10, vs_mlx_vlm=2.0,
               vs_reference=1.0, vs_autoregressive=3.0)
VLLM_H100 = dict(canvas_ms=145.7, step_ms=9.1, tok_s=895.0)
NO_STOP = 1e-30  # a confidence threshold no mean entropy falls below: every canvas runs all its steps


# ---------------------------------------------------------------------------------------------
# process setup
# ---------------------------------------------------------------------------------------------
def find_openblas():
    for p in OPENBLAS_CANDIDATES:
        if os.path.exists(p):
            return p
    return None


def maybe_reexec_with_openblas(argv):
    """Re-runs this command with OpenBLAS preloaded (Linux, library present, not yet loaded)."""
    if not sys.platform.startswith("linux") or "--no-openblas" in argv:
        return
    if os.environ.get("DG_BENCH_REEXEC") or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = find_openblas()
    if lib is None:
        print("note: OpenBLAS not found (apt-get install libopenblas0-pthread); MLX CPU matmuls "
              "use the wheel's slow BLAS", file=sys.stderr)
        return
    env = dict(os.environ, DG_BENCH_REEXEC="1",
               LD_PRELOAD=" ".join(x for x in (lib, os.environ.get("LD_PRELOAD", "")) if x))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mlx_diffusiongemma.benchmark", *argv], env)


def blas_in_process():
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for lib in ("libopenblas", "libmkl", "libblis"):
        if lib in maps:
            return lib
    return "MLX wheel default"


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def rss_bytes(field="VmRSS"):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mem_available():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def env_info():
    import mlx.core as mx

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "mlx_diffusiongemma",
                 ":!mlx_diffusiongemma/benchmark.py")
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
                   f"{mem / GiB:.0f} GiB" if mem else platform.platform(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "gpu": _gpu_name(),
        "blas": blas_in_process(),
        "commit": (_git("rev-parse", "--short", "HEAD") or "?") + (" (model code modified)" if dirty else ""),
    }


def _gpu_name():
    import mlx.core as mx

    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return None


def gpu_available():
    return _gpu_name() is not None


def cpu_busy_seconds():
    """Seconds of CPU time all processes have used (from /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        vals = [int(x) for x in fields]
    except (OSError, ValueError, IndexError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """How much CPU other processes took while a section ran: timings on a shared machine are only
    as good as this figure is small."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), cpu_busy_seconds(), own_cpu_seconds()

    def others_share(self):
        busy = cpu_busy_seconds()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        others = (busy - self.busy0) - (own_cpu_seconds() - self.own0)
        return max(others, 0.0) / (wall * (os.cpu_count() or 1))


def wait_idle(max_wait, threshold=0.1):
    """Waits (up to `max_wait` seconds) until other processes use under `threshold` of the CPUs."""
    t_end = time.time() + max_wait
    while True:
        m = CpuMeter()
        time.sleep(2)
        share = m.others_share()
        if share is None or share < threshold:
            return share
        if time.time() > t_end:
            say(f"  note: the machine is busy ({share:.0%} of its CPUs used by other processes); timing anyway")
            return share
        time.sleep(5)


class Report:
    def __init__(self, json_path=None):
        self.json_path = json_path
        self.env = None

    def header(self, section):
        self.env = env_info()
        e = self.env
        print(f"== {section} | {e['date']} | {e['machine']} | MLX {e['mlx']} on {e['device']}"
              f"{' (' + e['gpu'] + ')' if e['gpu'] else ''} | BLAS: {e['blas']} | commit {e['commit']}",
              flush=True)

    def save(self, section, figures):
        if self.json_path:
            with open(self.json_path, "a") as f:
                f.write(json.dumps({"section": section, "env": self.env, **figures}, default=str) + "\n")


def say(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def timeit(fn, n=3, warmup=1):
    """Median seconds of `n` calls after `warmup` calls (fn must evaluate what it builds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _arrays(tree):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if isinstance(tree, mx.array):
        return [tree]
    try:
        return [v for _, v in tree_flatten(tree) if isinstance(v, mx.array)]
    except Exception:
        return []


@contextlib.contextmanager
def timed_calls(classes, acc, key=None):
    """Wraps `__call__` of the given module classes: inputs are evaluated first, then the call and
    its outputs, and the seconds are added to `acc[key(module)]` (default: the class name)."""
    import mlx.core as mx

    originals = {}

    def wrap(orig):
        def call(self, *a, **k):
            mx.eval(_arrays((a, k)))
            t = time.perf_counter()
            out = orig(self, *a, **k)
            mx.eval(_arrays(out))
            name = key(self) if key else type(self).__name__
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
            return out
        return call

    for cls in classes:
        if cls not in originals:
            originals[cls] = cls.__call__
            cls.__call__ = wrap(cls.__call__)
    try:
        yield acc
    finally:
        for cls, f in originals.items():
            cls.__call__ = f


def text_config(text, canvas_length=FULL_CANVAS):
    return {"model_type": "diffusion_gemma", "text_config": dict(text), "canvas_length": canvas_length}


def make_args(text=FULL_TEXT, layers=None, canvas_length=FULL_CANVAS, **overrides):
    from .config import ModelArgs

    t = dict(text, **overrides)
    if layers is not None:
        t["num_hidden_layers"] = layers
    return ModelArgs.from_config(text_config(t, canvas_length))


def layer_counts(args):
    s = sum(args.is_sliding(i) for i in range(args.num_hidden_layers))
    return s, args.num_hidden_layers - s


def decoder_cache(cache, canvas_len):
    """What a denoising loop passes to `model.decode`: the per-canvas K/V buffers (CanvasKV) when
    this version of the model has them, else the prompt cache itself."""
    try:
        from .cache import CanvasKV
    except ImportError:
        return cache
    return CanvasKV(cache, canvas_len)


def _quant():
    try:
        from . import quant

        return quant
    except ImportError:
        return None


def is_high_precision(path):
    q = _quant()
    if q is not None:
        return q.is_high_precision(path)
    return (path.endswith(("embed_tokens", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
            or ".self_attn." in path or "router" in path)


def module_params(path, in_dims, default, recipe):
    """Quantization of one quantizable module (the project's recipe, or the same rule locally)."""
    q = _quant()
    if q is not None:
        return q.module_params(path, in_dims, default, recipe)
    params = dict(group_size=64, bits=8, mode="affine") if recipe == "mixed" and is_high_precision(path) else dict(default)
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

    from .model import Model

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
    cats = {}
    total = 0
    for path, shape in quantizable.items():
        n = math.prod(shape)
        params = None if default is None else module_params(path, shape[-1], default, name)
        b = 2 * n if params is None else quantized_bytes(n, params)
        cats[category(path)] = cats.get(category(path), 0) + b
        total += b
    for path, shape in others.items():
        b = 2 * math.prod(shape)
        cats[category(path)] = cats.get(category(path), 0) + b
        total += b
    return total, cats


RECIPES = [
    ("mixed 4-bit (default: 8-bit embeddings/attention/dense MLP/router, 4-bit experts)", "mixed", 4),
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
# building a full-shape quantized model without materialising its float weights
# ---------------------------------------------------------------------------------------------
def build_random_quantized(args, default, recipe="mixed", dtype=None, seed=0, verbose=True):
    """A Model with random weights, quantized with `recipe`, built module by module: the float
    weights of `Model(args)` stay lazy and are never evaluated; each quantized module gets random
    packed weights and random scales (bf16) directly, and is evaluated before the next one."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from .model import Model

    dtype = dtype or mx.bfloat16
    model = Model(args)

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or "weight" not in module:
            return False
        return module_params(path, module.weight.shape[-1], default, recipe) or False

    nn.quantize(model, group_size=default["group_size"], bits=default["bits"], mode=default["mode"],
                class_predicate=predicate)
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
            say(f"  quantized {n + 1}/{len(quantized)} modules ({path}), "
                f"active {mx.get_active_memory() / GiB:.2f} GiB, {time.perf_counter() - t0:.0f} s")
    # everything else (norms, router scales, layer scalars): cast to the activation dtype
    rest = [(k, v) for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)
            and not k.endswith((".scales", ".biases"))]
    model.load_weights([(k, v.astype(dtype)) for k, v in rest], strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model


def build_random_float(args, dtype, verbose=True):
    """A Model with random float weights in `dtype`, evaluated one layer at a time."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from .model import Model

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


def param_bytes(model):
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def random_prompt(n, vocab, seed=0):
    import numpy as np

    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


# ---------------------------------------------------------------------------------------------
# section: weights (analytic)
# ---------------------------------------------------------------------------------------------
def section_weights(opts, rep):
    rep.header("weights: resident text-model weight bytes, full shape (analytic, nothing allocated)")
    args = make_args(FULL_TEXT)
    results = all_recipe_bytes(args)
    cats_order = ["experts", "embeddings", "attention", "dense MLP", "router", "self-conditioning MLP", "norms, scales"]
    say(f"  {'recipe':<84} {'bytes':>15} {'GB':>7} {'GiB':>7}")
    figures = {}
    for label, (total, cats) in results.items():
        say(f"  {label:<84} {total:>15,} {total / GB:>7.2f} {total / GiB:>7.2f}")
        figures[label] = {"bytes": total, "by_category": cats}
    mixed_label = RECIPES[0][0]
    total, cats = results[mixed_label]
    say("  mixed 4-bit by part: " + ", ".join(f"{c} {cats.get(c, 0) / GB:.3f} GB" for c in cats_order))
    t = TARGETS["resident_4bit_gb"]
    say(f"  target <= {t:.0f} GB resident at 4 bits: mixed {total / GB:.2f} GB "
        f"({'met' if total / GB <= t else 'missed'} by {abs(t - total / GB):.2f} GB); "
        f"uniform 4-bit {results[RECIPES[1][0]][0] / GB:.2f} GB")
    say("  (scales and biases counted in bf16, group 64, affine; the vision tower, which this port does "
        "not load, is not included)")
    rep.save("weights", {"recipes": figures})
    return results


# ---------------------------------------------------------------------------------------------
# section: build (full shape, mixed 4-bit, random weights)
# ---------------------------------------------------------------------------------------------
def section_build(opts, rep):
    import mlx.core as mx

    rep.header("build: full-shape model, random weights directly quantized (mixed 4-bit)")
    args = make_args(FULL_TEXT, layers=opts.layers)
    default = default_quant(4)
    expected, _ = recipe_bytes(args, ("mixed", default))
    avail = mem_available()
    if avail is not None and avail < expected + 2 * GiB and not opts.force:
        say(f"  skipped: needs ~{(expected + 2 * GiB) / GiB:.1f} GiB free, {avail / GiB:.1f} GiB available "
            "(--force to try anyway)")
        return None
    mx.reset_peak_memory()
    rss0 = rss_bytes()
    t = time.perf_counter()
    model = build_random_quantized(args, default, "mixed")
    dt = time.perf_counter() - t
    nbytes = param_bytes(model)
    active, peak = mx.get_active_memory(), mx.get_peak_memory()
    rss, hwm = rss_bytes(), rss_bytes("VmHWM")
    say(f"  {args.num_hidden_layers} layers built in {dt:.0f} s")
    say(f"  parameter bytes {nbytes:,} ({nbytes / GB:.2f} GB, {nbytes / GiB:.2f} GiB); analytic {expected:,} "
        f"({'equal' if nbytes == expected else f'differs by {nbytes - expected:+,}'})")
    say(f"  MLX active {active / GB:.2f} GB, MLX peak while building {peak / GB:.2f} GB, process RSS "
        f"{rss / GB:.2f} GB (high-water {hwm / GB:.2f} GB, {rss0 / GB:.2f} GB before)" if rss else "")
    figures = dict(layers=args.num_hidden_layers, seconds=dt, param_bytes=nbytes, analytic_bytes=expected,
                   mlx_active=active, mlx_peak=peak, rss=rss, rss_hwm=hwm)
    rep.save("build", figures)
    return model


# ---------------------------------------------------------------------------------------------
# section: fullwidth (activation peak, step time, sampler share; reduced depth, extrapolated)
# ---------------------------------------------------------------------------------------------
def sampler_parts(model, logits, temp, bound, key):
    """The vocabulary-sized work of one denoising step as this version of the project does it:
    (sampler outputs, self-conditioning probabilities, the softmax that makes them or None when
    the sampler returns them itself). Newer samplers take the embedding dtype and return the
    probabilities; older ones leave a separate softmax to the loop."""
    import inspect

    from .sampler import denoise_sample, self_conditioning_probs

    dt = model.embed_dtype
    if "probs_dtype" in inspect.signature(denoise_sample).parameters:
        out = denoise_sample(logits, temp, bound, key, None, None, dt)
        if len(out) >= 5:
            return out, out[4], None
    else:
        out = denoise_sample(logits, temp, bound, key)
    return out, self_conditioning_probs(logits, temp, dt), (lambda: self_conditioning_probs(logits, temp, dt))


def sampler_step(model, logits, temp, bound, key):
    """(next canvas, next step's soft embeddings), as the denoising loop computes them."""
    out, probs, _ = sampler_parts(model, logits, temp, bound, key)
    return out[0], model.soft_embeddings_from_probs(probs)


def time_sampler(model, logits, n=3):
    """Seconds of the vocabulary-sized work of one denoising step outside the decoder forward:
    the compiled sampler step, the self-conditioning softmax (where separate) and the
    (probs @ embedding) matmul."""
    import mlx.core as mx

    temp = mx.array(0.6, dtype=mx.float32)
    bound = mx.array(0.1, dtype=mx.float32)
    key = mx.random.key(0)
    t_sample = timeit(lambda: mx.eval(sampler_parts(model, logits, temp, bound, key)[0]), n)
    _, probs, softmax = sampler_parts(model, logits, temp, bound, key)
    t_probs = timeit(lambda: mx.eval(softmax()), n) if softmax is not None else 0.0
    mx.eval(probs)
    t_matmul = timeit(lambda: mx.eval(model.soft_embeddings_from_probs(probs)), n)
    del probs
    t_step = timeit(lambda: mx.eval(sampler_step(model, logits, temp, bound, key)), n)
    out = dict(denoise_sample=t_sample, sc_softmax=t_probs, sc_matmul=t_matmul,
               sc_total=t_probs + t_matmul, total=t_step)
    import inspect

    from .sampler import denoise_sample

    if model.embed_dtype != mx.bfloat16 and "probs_dtype" in inspect.signature(denoise_sample).parameters:
        # what a bf16 (e.g. quantized) checkpoint's sampler does: probabilities in bf16
        out["denoise_sample_bf16_probs"] = timeit(
            lambda: mx.eval(denoise_sample(logits, temp, bound, key, None, None, mx.bfloat16)), n)
    return out


def per_layer_times(model, canvas, dcache, soft=None):
    """Seconds of each decoder layer, and of the self-conditioning MLP, in one forward (outputs
    evaluated module by module)."""
    import mlx.core as mx

    ids = {id(l): i for i, l in enumerate(model.layers)}
    sc = model.model.decoder.self_conditioning
    acc = {}
    with timed_calls([type(model.layers[0]), type(sc)], acc,
                     key=lambda m: "sc" if m is sc else ids.get(id(m), -1)):
        mx.eval(model.decode(canvas, dcache, soft_embeds=soft))
    return [acc.get(i, 0.0) for i in range(len(model.layers))], acc.get("sc", 0.0)


def canvas_kv_layers(dcache, n_layers):
    """Bytes of each layer's per-canvas K/V buffers, when the decoder cache has them."""
    keys, values = getattr(dcache, "keys", None), getattr(dcache, "values", None)
    if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != n_layers:
        return None
    return [(0 if k is None else k.nbytes) + (0 if v is None else v.nbytes) for k, v in zip(keys, values)]


def section_fullwidth(opts, rep):
    import mlx.core as mx

    rep.header(f"fullwidth: full width, {opts.layers} layers, {opts.prompt}-token prompt, one decoder step "
               f"on a {FULL_CANVAS}-token canvas")
    args = make_args(FULL_TEXT, layers=opts.layers)
    full = make_args(FULL_TEXT)
    dtype = mx.float32 if opts.dtype == "float32" else mx.bfloat16
    Ls, Lf = layer_counts(args)
    S30, F30 = layer_counts(full)
    mx.random.seed(0)
    t = time.perf_counter()
    model = build_random_float(args, dtype)
    W = param_bytes(model)
    say(f"  weights: {W / GB:.2f} GB ({opts.dtype}), {Ls} sliding + {Lf} full layers, built in "
        f"{time.perf_counter() - t:.0f} s")
    mx.clear_cache()
    ids = mx.array([random_prompt(opts.prompt, args.vocab_size)], dtype=mx.int32)
    canvas = mx.random.randint(0, args.vocab_size, (1, FULL_CANVAS), dtype=mx.int32)
    mx.eval(ids, canvas)

    # 1. encode (prefill) the prompt in chunks
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    cache = model.make_cache()
    t = time.perf_counter()
    model.encode(ids, cache, step=opts.chunk)
    t_enc = time.perf_counter() - t
    peak_enc = mx.get_peak_memory()
    kv_layers = [(0 if k is None else k.nbytes) + (0 if v is None else v.nbytes)
                 for k, v in (cache.fetch(i) for i in range(args.num_hidden_layers))]
    KV = sum(kv_layers)
    kv_s = [b for i, b in enumerate(kv_layers) if args.is_sliding(i)]
    kv_f = [b for i, b in enumerate(kv_layers) if not args.is_sliding(i)]
    # What the cache really holds can exceed its arrays' sizes: an array sliced out of a larger
    # one (the sliding layers' trim) keeps the larger buffer alive.
    KV_held = mx.get_active_memory() - base
    pinned = max(KV_held - KV, 0)
    say(f"  encode: {opts.prompt} tokens in chunks of {opts.chunk}: {t_enc:.1f} s ({opts.prompt / t_enc:.0f} tok/s); "
        f"prompt K/V {KV / GB:.3f} GB (sliding layer {max(kv_s, default=0) / 1e6:.1f} MB, full layer "
        f"{max(kv_f, default=0) / 1e6:.1f} MB); memory held after encoding {KV_held / GB:.3f} GB "
        f"({pinned / GB:.3f} GB more than the K/V arrays: buffers kept alive by trimmed views)")

    # 2. one decoder step, as the denoising loop runs it (per-canvas K/V buffers, then decode)
    mx.reset_peak_memory()
    a0 = mx.get_active_memory()
    dcache = decoder_cache(cache, FULL_CANVAS)
    copy = mx.get_active_memory() - a0
    t = time.perf_counter()
    logits = model.decode(canvas, dcache)
    mx.eval(logits)
    t_first = time.perf_counter() - t
    peak_dec = mx.get_peak_memory()
    # 3. sampler and self-conditioning of that step, logits and buffers still held
    mx.reset_peak_memory()
    temp, bound, key = mx.array(0.6), mx.array(0.1), mx.random.key(0)
    new_canvas, soft = sampler_step(model, logits, temp, bound, key)
    mx.eval(new_canvas, soft)
    peak_samp = mx.get_peak_memory()
    # 4. a second step with self-conditioning (the steady state)
    mx.reset_peak_memory()
    logits2 = model.decode(new_canvas, dcache, soft_embeds=soft)
    mx.eval(logits2)
    peak_dec2 = mx.get_peak_memory()
    del logits2
    tr_enc = peak_enc - base - KV_held
    tr_dec = max(peak_dec, peak_dec2) - a0 - copy
    tr_samp = peak_samp - a0 - copy
    say(f"  peak over weights+prompt cache: encode {tr_enc / GB:.3f} GB, decoder step {tr_dec / GB:.3f} GB "
        f"(+ per-canvas K/V buffers {copy / GB:.3f} GB), sampler+self-conditioning {tr_samp / GB:.3f} GB")

    # timings
    n = opts.repeat
    t_dec = timeit(lambda: mx.eval(model.decode(new_canvas, dcache, soft_embeds=soft)), n)
    lt, t_scmlp = per_layer_times(model, new_canvas, dcache, soft)
    t_s = statistics.mean([x for i, x in enumerate(lt) if args.is_sliding(i)]) if Ls else 0.0
    t_f = statistics.mean([x for i, x in enumerate(lt) if not args.is_sliding(i)])
    h = model.decode_hidden(new_canvas, dcache, soft)
    mx.eval(h)
    t_head = timeit(lambda: mx.eval(model.lm_logits(h)), n)
    del h
    # The layers' share of the forward (time outside the LM head and the self-conditioning MLP)
    # is split between sliding and full layers in the proportion of their own timings.
    t_layers = max(t_dec - t_head - t_scmlp, 0.0)
    scale = t_layers / sum(lt) if sum(lt) else 1.0
    t_s, t_f = t_s * scale, t_f * scale
    step30 = t_head + t_scmlp + S30 * t_s + F30 * t_f
    samp = time_sampler(model, logits, n)
    say(f"  decoder step ({opts.layers} layers): {t_dec * 1e3:.0f} ms = final norm + LM head {t_head * 1e3:.0f} "
        f"+ self-conditioning MLP {t_scmlp * 1e3:.0f} + layers {t_layers * 1e3:.0f} (sliding {t_s * 1e3:.0f} ms, "
        f"full {t_f * 1e3:.0f} ms)")
    say(f"  decoder step scaled to {S30}+{F30} layers: {step30 * 1e3:.0f} ms "
        f"(= {t_head * 1e3:.0f} + {t_scmlp * 1e3:.0f} + {S30} x {t_s * 1e3:.0f} + {F30} x {t_f * 1e3:.0f})")
    say(f"  sampler at vocab {args.vocab_size}, canvas {FULL_CANVAS}: {samp['total'] * 1e3:.0f} ms in all = "
        f"denoise_sample {samp['denoise_sample'] * 1e3:.0f} ms + self-conditioning softmax "
        f"{samp['sc_softmax'] * 1e3:.0f} ms + probs @ embedding {samp['sc_matmul'] * 1e3:.0f} ms (parts timed apart)")
    if "denoise_sample_bf16_probs" in samp:
        b = samp["denoise_sample_bf16_probs"]
        say(f"  with bf16 self-conditioning probabilities (a bf16 or quantized checkpoint): denoise_sample "
            f"{b * 1e3:.0f} ms; share of a 30-layer step {(b + samp['sc_total']) / (step30 + b + samp['sc_total']):.1%}")
    share = samp["total"] / (step30 + samp["total"])
    share_ns = samp["denoise_sample"] / (step30 + samp["total"])
    share_cap = samp["total"] / (t_dec + samp["total"])
    tgt = TARGETS["sampler_share"]
    say(f"  sampler share of a 30-layer step (decoder + sampler + self-conditioning): {share:.1%} "
        f"(denoise_sample alone {share_ns:.1%}; at {opts.layers} layers {share_cap:.1%}); "
        f"target <= {tgt:.0%}: {'met' if share <= tgt else 'missed'} by {abs(share - tgt) * 100:.1f} points")

    # memory extrapolation to 30 layers, bf16 activations and K/V, mixed 4-bit weights
    W30 = recipe_bytes(full, ("mixed", default_quant(4)))[0]
    f_kv = 2 / dtype.size  # K/V in bf16 on the real model
    kv30 = f_kv * (S30 * statistics.mean(kv_s) + F30 * statistics.mean(kv_f)) if kv_s else f_kv * 30 * statistics.mean(kv_f)
    pinned30 = f_kv * pinned * S30 / Ls if Ls else 0.0  # the extra is the sliding layers' (full layers are not trimmed)
    copy_layers = canvas_kv_layers(dcache, args.num_hidden_layers)
    if copy_layers is not None:
        cs = [b for i, b in enumerate(copy_layers) if args.is_sliding(i)]
        cf = [b for i, b in enumerate(copy_layers) if not args.is_sliding(i)]
        copy30 = f_kv * (S30 * (statistics.mean(cs) if cs else 0) + F30 * statistics.mean(cf))
    else:
        copy30 = f_kv * copy * (30 / args.num_hidden_layers)
    tr = max(tr_enc, tr_dec, tr_samp)
    peak30 = W30 + kv30 + pinned30 + copy30 + tr
    peak30_enc = W30 + kv30 + pinned30 + tr_enc
    peak30_dec = W30 + kv30 + pinned30 + copy30 + max(tr_dec, tr_samp)
    tgt = TARGETS["peak_4096_gb"]
    say(f"  extrapolated peak, 30 layers, mixed 4-bit weights {W30 / GB:.2f} GB + prompt K/V {kv30 / GB:.3f} GB (bf16) "
        f"+ pinned by trimmed views {pinned30 / GB:.3f} GB + per-canvas K/V buffers {copy30 / GB:.3f} GB + largest transient {tr / GB:.3f} GB "
        f"(measured, {opts.dtype}) = {peak30 / GB:.2f} GB ({peak30 / GiB:.2f} GiB); prefill alone "
        f"{peak30_enc / GB:.2f} GB, denoising {peak30_dec / GB:.2f} GB")
    say(f"  target <= {tgt:.0f} GB peak with a {opts.prompt}-token prompt: {'met' if peak30 / GB <= tgt else 'missed'} "
        f"by {abs(tgt - peak30 / GB):.2f} GB")
    figures = dict(layers=opts.layers, prompt=opts.prompt, chunk=opts.chunk, dtype=opts.dtype, weights=W,
                   encode_s=t_enc, prompt_kv=KV, prompt_cache_held=KV_held, pinned=pinned, kv_layers=kv_layers, canvas_kv=copy, peak_encode=peak_enc,
                   peak_decode=peak_dec, peak_decode_sc=peak_dec2, peak_sampler=peak_samp,
                   transient_encode=tr_enc, transient_decode=tr_dec, transient_sampler=tr_samp,
                   decode_s=t_dec, first_decode_s=t_first, layer_s=lt, sliding_layer_s=t_s, full_layer_s=t_f,
                   lm_head_s=t_head, sc_mlp_s=t_scmlp, step30_s=step30, sampler=samp, sampler_share=share,
                   weights30_mixed4=W30, kv30=kv30, pinned30=pinned30, canvas_kv30=copy30, peak30=peak30)
    rep.save("fullwidth", figures)
    return figures


# ---------------------------------------------------------------------------------------------
# mid-size checkpoint and peers
# ---------------------------------------------------------------------------------------------
def ensure_mid_checkpoint(workdir, seed=0):
    path = Path(workdir) / "mid"
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from make_checkpoints import write_checkpoint
    except ImportError as e:
        raise SystemExit(f"cannot write the mid-size checkpoint: tests/make_checkpoints.py not importable ({e})")
    say(f"  writing the mid-size random checkpoint to {path} (float32, transformers)")
    t = time.perf_counter()
    write_checkpoint(path, seed=seed, canvas_length=FULL_CANVAS, **MID_TEXT)
    say(f"  written in {time.perf_counter() - t:.0f} s")
    return path


def mlx_vlm_copy(path, steps):
    """A copy of the checkpoint folder for mlx-vlm: its config reader does not know
    `per_layer_config`, so the full-attention shapes go in as global_head_dim /
    num_global_key_value_heads; the weights are linked. Its generation_config holds the
    reference sampler's defaults with early stopping disabled."""
    dst = Path(str(path) + "-mlx-vlm")
    dst.mkdir(exist_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    tc = cfg["text_config"]
    plc = tc.pop("per_layer_config", None) or {}
    for key, over in plc.items():
        if "head_dim" in over:
            tc["global_head_dim"] = over["head_dim"]
        if "num_key_value_heads" in over:
            tc["num_global_key_value_heads"] = over["num_key_value_heads"]
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    gen = dict(max_denoising_steps=steps, confidence_threshold=NO_STOP, stability_threshold=1, t_min=0.4,
               t_max=0.8, sampler_config={"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1})
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=1))
    for f in path.glob("*.safetensors*"):
        link = dst / f.name
        if not link.exists():
            os.symlink(f.resolve(), link)
    return dst


def run_ours(path, ids, max_tokens, steps, warm=True):
    """Our stream_generate at `steps` fixed denoising steps per canvas (early stop disabled, no
    EOS); the seconds between successive denoising steps come from draft_callback."""
    import mlx.core as mx

    from .generation import stream_generate
    from .loader import load_model

    model = load_model(path)
    V = model.args.vocab_size
    if warm:  # compiles the sampler graph and warms the allocator
        for _ in stream_generate(model, None, ids[:64], max_tokens=FULL_CANVAS, max_denoising_steps=2,
                                 confidence_threshold=NO_STOP, eos_token_ids=[], seed=1):
            pass
    marks = []
    t = time.perf_counter()
    for r in stream_generate(model, None, ids, max_tokens=max_tokens, max_denoising_steps=steps,
                             confidence_threshold=NO_STOP, eos_token_ids=[], seed=0,
                             draft_callback=lambda d: marks.append((d.canvas, time.perf_counter()))):
        pass
    total = time.perf_counter() - t
    intervals = [b[1] - a[1] for a, b in zip(marks, marks[1:]) if a[0] == b[0]]
    # isolated decoder forward (logits evaluated), per-canvas buffers reused as in the loop
    cache = model.encode(mx.array([ids], dtype=mx.int32), model.make_cache())
    dcache = decoder_cache(cache, model.args.canvas_length)
    canvas = mx.random.randint(0, V, (1, model.args.canvas_length), dtype=mx.int32)
    t_dec = timeit(lambda: mx.eval(model.decode(canvas, dcache)), 3)
    out = dict(prompt_tps=r.prompt_tps, generation_tokens=r.generation_tokens, generation_tps=r.generation_tps,
               decoder_forwards=r.decoder_forwards, step_s=statistics.median(intervals), decode_forward_s=t_dec,
               peak_gb=r.peak_memory, total_s=total)
    del model, cache, dcache
    gc.collect()
    mx.clear_cache()
    return out


class _Detokenizer:
    last_segment = ""

    def reset(self):
        pass

    def add_token(self, token, skip_special_token_ids=None):
        pass

    def finalize(self):
        pass


class _NoTokenizer:
    """What mlx-vlm's diffusion loop needs of a tokenizer when no text is produced: no EOS."""

    detokenizer = _Detokenizer()

    @staticmethod
    def stopping_criteria(token):
        return False


def run_mlx_vlm(path, ids, max_tokens, steps, warm=True):
    """mlx-vlm 0.7.10's DiffusionGemma: its entropy-bound sampler at temperature 1 (a categorical
    draw per position, as ours and the reference do), `steps` denoising steps per canvas, its
    stable-and-confident stop made unreachable (confidence threshold 1e-30)."""
    import mlx.core as mx

    try:
        from mlx_vlm.generate.diffusion import stream_diffusion_generate
        from mlx_vlm.utils import load_model as vlm_load_model
    except ImportError as e:
        return {"error": f"mlx-vlm not importable ({e}); pip install mlx-vlm==0.7.10 --no-deps, requests, Pillow"}
    import mlx_vlm

    vpath = mlx_vlm_copy(path, steps)
    model = vlm_load_model(vpath)
    tok = _NoTokenizer()
    marks = []
    orig = model.diffusion_decoder_logits

    def decoder_logits(*a, **k):
        marks.append(time.perf_counter())
        return orig(*a, **k)

    model.diffusion_decoder_logits = decoder_logits

    def gen(prompt, n_tokens, n_steps):
        last = None
        for last in stream_diffusion_generate(
            model, tok, tok, mx.array([prompt]), None, None, max_tokens=n_tokens, skip_special_token_ids=[],
            temperature=1.0, max_denoising_steps=n_steps, diffusion_sampler="entropy-bound",
        ):
            pass
        return last

    if warm:
        gen(ids[:64], FULL_CANVAS, 2)
    marks.clear()
    mx.reset_peak_memory()
    t = time.perf_counter()
    r = gen(ids, max_tokens, steps)
    total = time.perf_counter() - t
    # decoder calls are timestamped when their graphs are built; mlx-vlm evaluates a step at its
    # stop test, so the spacing of calls within a canvas is its per-step time (its first two steps
    # of a canvas are evaluated together, so those are left out)
    per_canvas = [marks[i:i + steps] for i in range(0, len(marks), steps)]
    intervals = [b - a for c in per_canvas for a, b in list(zip(c, c[1:]))[1:]]
    out = dict(version=getattr(mlx_vlm, "__version__", "?"), prompt_tps=r.prompt_tps,
               generation_tokens=r.generation_tokens, generation_tps=r.generation_tps,
               decoder_forwards=int(r.diffusion_denoising_steps), step_s=statistics.median(intervals),
               peak_gb=r.peak_memory, total_s=total)
    # isolated decoder forward
    cache = model.diffusion_prefill_cache(mx.array([ids]))
    mx.eval([c.state for c in cache])
    canvas = mx.random.randint(0, model.config.text_config.vocab_size, (1, FULL_CANVAS)).astype(mx.int32)
    masks = model.diffusion_decoder_masks(canvas, cache, None)
    out["decode_forward_s"] = timeit(lambda: mx.eval(orig(canvas, cache=cache, self_conditioning=None,
                                                          decoder_attention_mask=masks)), 3)
    del model, cache
    gc.collect()
    mx.clear_cache()
    return out


def mlx_lm_autoregressive(path):
    """mlx-lm's gemma4_text built from the checkpoint's config (MoE block on, no per-layer inputs,
    no shared K/V) with the decoder's weights: the same network run autoregressively."""
    import mlx.core as mx
    from mlx_lm.models import gemma4_text

    from .config import ModelArgs
    from .loader import load_weights_lazily

    cfg = json.loads((path / "config.json").read_text())
    a = ModelArgs.from_config(cfg)
    full = [i for i in range(a.num_hidden_layers) if not a.is_sliding(i)]
    lm_args = gemma4_text.ModelArgs(
        model_type="gemma4_text", hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
        intermediate_size=a.intermediate_size, num_attention_heads=a.num_attention_heads,
        head_dim=a.head_dim, global_head_dim=a.layer_head_dims[full[0]], rms_norm_eps=a.rms_norm_eps,
        vocab_size=a.vocab_size, vocab_size_per_layer_input=a.vocab_size,
        num_key_value_heads=a.num_key_value_heads, num_global_key_value_heads=a.layer_kv_heads[full[0]],
        num_kv_shared_layers=0, hidden_size_per_layer_input=0, sliding_window=a.sliding_window,
        layer_types=list(a.layer_types), attention_k_eq_v=True, final_logit_softcapping=a.final_logit_softcapping,
        use_double_wide_mlp=False, enable_moe_block=True, num_experts=a.num_experts,
        top_k_experts=a.top_k_experts, moe_intermediate_size=a.moe_intermediate_size,
        rope_parameters=dict(a.rope_parameters), max_position_embeddings=a.max_position_embeddings,
        tie_word_embeddings=True,
    )
    lm = gemma4_text.Model(lm_args)
    weights = {}
    for k, v in load_weights_lazily(path).items():
        if k.startswith("model.decoder.") and not k.startswith("model.decoder.self_conditioning."):
            weights["model." + k[len("model.decoder."):]] = v
    lm.load_weights(list(lm.sanitize(weights).items()), strict=True)
    mx.eval(lm.parameters())
    lm.eval()
    return lm


def run_autoregressive(path, ids, n_tokens):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    lm = mlx_lm_autoregressive(path)
    for _ in zip(range(8), generate_step(mx.array(ids[:64]), lm, max_tokens=8)):
        pass
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for n, _ in enumerate(generate_step(mx.array(ids), lm, max_tokens=n_tokens), start=1):
        if first is None:
            first = time.perf_counter()
        last = time.perf_counter()
    out = dict(prompt_tps=len(ids) / (first - t0), tokens=n,
               decode_tps=(n - 1) / (last - first), peak_gb=mx.get_peak_memory() / GB)
    del lm
    gc.collect()
    mx.clear_cache()
    return out


def run_reference_child(path, prompt_len, max_tokens, steps, seed, vocab):
    """The transformers reference, in a child process without LD_PRELOAD (see the module doc)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["DG_BENCH_REEXEC"] = "1"
    cmd = [sys.executable, "-m", "mlx_diffusiongemma.benchmark", "_reference", "--path", str(path),
           "--prompt", str(prompt_len), "--max-tokens", str(max_tokens), "--steps", str(steps),
           "--seed", str(seed), "--vocab", str(vocab)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    for line in p.stdout.splitlines():
        if line.startswith("JSON "):
            return json.loads(line[5:])
    return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]}


def reference_main(opts):
    """Child: DiffusionGemmaForBlockDiffusion.generate at `steps` denoising steps, early stop off."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    import transformers

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(opts.path, dtype=torch.float32).eval()
    ids = random_prompt(opts.prompt, opts.vocab, opts.seed)
    enc_times = []

    def pre(mod, args, kwargs):
        enc_times.append([time.perf_counter(), None])

    def post(mod, args, kwargs, out):
        enc_times[-1][1] = time.perf_counter()

    model.model.encoder.register_forward_pre_hook(pre, with_kwargs=True)
    model.model.encoder.register_forward_hook(post, with_kwargs=True)
    fwd_times = []
    forward = model.forward  # generate() calls self.forward for every decoder step

    def timed_forward(*a, **k):
        t = time.perf_counter()
        out = forward(*a, **k)
        fwd_times.append(time.perf_counter() - t)
        return out

    model.forward = timed_forward

    class Marks:
        def __init__(self):
            self.drafts = []

        def put(self, value):
            self.drafts.append(None)  # canvas boundary

        def put_draft(self, value=None, logits=None):
            self.drafts.append(time.perf_counter())

        def end(self):
            pass

    def gen(prompt, n_tokens, n_steps, streamer=None):
        with torch.no_grad():
            return model.generate(torch.tensor([prompt]), max_new_tokens=n_tokens, max_denoising_steps=n_steps,
                                  confidence_threshold=NO_STOP, stability_threshold=1, eos_token_id=[-1],
                                  streamer=streamer)

    gen(ids[:64], FULL_CANVAS, 2)  # warm-up
    enc_times.clear()
    fwd_times.clear()
    marks = Marks()
    t = time.perf_counter()
    out = gen(ids, opts.max_tokens, opts.steps, marks)
    total = time.perf_counter() - t
    prefill = enc_times[0][1] - enc_times[0][0]
    n_new = out.sequences.shape[1] - len(ids)
    intervals = [b - a for a, b in zip(marks.drafts, marks.drafts[1:]) if a is not None and b is not None]
    res = dict(version=transformers.__version__, torch=torch.__version__, threads=torch.get_num_threads(),
               prompt_tps=len(ids) / prefill, generation_tokens=int(n_new),
               generation_tps=n_new / (total - prefill), step_s=statistics.median(intervals),
               decoder_forwards=len([d for d in marks.drafts if d is not None]), total_s=total,
               decode_forward_s=statistics.median(fwd_times) if fwd_times else None,
               peak_gb=(rss_bytes("VmHWM") or 0) / GB, peak_is_rss=True)
    print("JSON " + json.dumps(res), flush=True)


def section_peers(opts, rep):
    rep.header(f"peers: mid-size random checkpoint, {opts.prompt}-token prompt, {opts.max_tokens} new tokens, "
               f"{opts.steps} fixed denoising steps per canvas, float32")
    path = ensure_mid_checkpoint(opts.workdir)
    say(f"  checkpoint {path}: " + ", ".join(f"{k}={v}" for k, v in MID_TEXT.items()))
    cfg = json.loads((path / "config.json").read_text())
    vocab = cfg["text_config"]["vocab_size"]
    ids = random_prompt(opts.prompt, vocab, opts.seed)
    res = {}
    skip = set(opts.skip or [])

    def release():  # the previous implementation's model must not count in the next one's peak
        import mlx.core as mx

        gc.collect()
        mx.clear_cache()

    if "ours" not in skip:
        say("  running ours (stream_generate) ...")
        res["ours"] = run_ours(path, ids, opts.max_tokens, opts.steps)
        release()
    if "mlx-vlm" not in skip:
        say("  running mlx-vlm ...")
        res["mlx-vlm"] = run_mlx_vlm(path, ids, opts.max_tokens, opts.steps)
        release()
    if "ar" not in skip:
        say("  running mlx-lm gemma4_text autoregressive ...")
        res["mlx-lm AR"] = run_autoregressive(path, ids, opts.ar_tokens)
        release()
    if "reference" not in skip:
        say("  running the transformers reference (child process, no LD_PRELOAD) ...")
        res["reference"] = run_reference_child(path, opts.prompt, opts.max_tokens, opts.steps, opts.seed, vocab)

    say(f"  {'implementation':<22} {'step ms':>8} {'fwd ms':>8} {'gen tok/s':>10} {'prefill tok/s':>14} "
        f"{'steps':>6} {'peak GB':>8}")
    for name in ("ours", "reference", "mlx-vlm"):
        r = res.get(name)
        if not r:
            continue
        if "error" in r:
            say(f"  {name:<22} error: {r['error']}")
            continue
        fwd = r.get("decode_forward_s")
        say(f"  {name:<22} {r['step_s'] * 1e3:>8.0f} {fwd * 1e3 if fwd else float('nan'):>8.0f} "
            f"{r['generation_tps']:>10.2f} {r['prompt_tps']:>14.0f} {r['decoder_forwards']:>6} "
            f"{r.get('peak_gb', float('nan')):>8.2f}")
    ar = res.get("mlx-lm AR")
    if ar and "error" not in ar:
        say(f"  {'mlx-lm AR (gemma4)':<22} {1e3 / ar['decode_tps']:>8.1f} {'':>8} {ar['decode_tps']:>10.2f} "
            f"{ar['prompt_tps']:>14.0f} {ar['tokens']:>6} {ar['peak_gb']:>8.2f}")
    say("  (step ms: time per denoising step inside whole generation, sampler included; fwd ms: one "
        "decoder forward with its logits; gen tok/s: new tokens / generation time after prefill; peak: "
        "MLX peak memory of the measured generation, for the reference the child process's peak RSS)")
    ours = res.get("ours")
    ratios = {}
    if ours:
        for name, key, tgt in (("mlx-vlm", "vs_mlx_vlm", TARGETS["vs_mlx_vlm"]),
                               ("reference", "vs_reference", TARGETS["vs_reference"])):
            r = res.get(name)
            if r and "error" not in r:
                g = ours["generation_tps"] / r["generation_tps"]
                s = r["step_s"] / ours["step_s"]
                ratios[key] = g
                verdict = "met" if (g >= tgt if tgt > 1 else g > tgt) else "missed"
                say(f"  ours / {name}: whole-generation tok/s x{g:.2f}, step time x{s:.2f} faster; "
                    f"target {'>= %.0fx' % tgt if tgt > 1 else 'faster'}: {verdict}")
        if ar and "error" not in ar:
            g = ours["generation_tps"] / ar["decode_tps"]
            ratios["vs_autoregressive"] = g
            tgt = TARGETS["vs_autoregressive"]
            say(f"  ours diffusion ({opts.steps} steps) / mlx-lm AR decode tok/s: x{g:.2f}; target >= {tgt:.0f}x: "
                f"{'met' if g >= tgt else 'missed'}")
    rep.save("peers", {"results": res, "ratios": ratios, "prompt": opts.prompt, "max_tokens": opts.max_tokens,
                       "steps": opts.steps, "shape": MID_TEXT})
    return res


# ---------------------------------------------------------------------------------------------
# section: profile (mid shape)
# ---------------------------------------------------------------------------------------------
def expert_strategies(E, D, I, N, K, n=3):
    """Seconds of one MoE block (gate|up, GeGLU, down, weighted sum) for N tokens, top-K of E
    experts, float32: gathered matmuls on rows sorted by expert (mlx-lm's SwitchLinear path),
    unsorted gathered matmuls, and dense all-expert matmuls (unchosen experts weighted 0)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import _gather_sort, _scatter_unsort

    w1 = mx.random.normal((E, 2 * I, D)) * 0.02
    w2 = mx.random.normal((E, D, I)) * 0.02
    x = mx.random.normal((N, D))
    idx = mx.argsort(mx.random.uniform(shape=(N, E)), axis=-1)[:, :K].astype(mx.uint32)
    wts = mx.softmax(mx.random.normal((N, K)), axis=-1)
    mx.eval(w1, w2, x, idx, wts)

    def gathered(sort):
        xs = mx.expand_dims(x, (-2, -3))
        ii, inv = idx, None
        if sort:
            xs, ii, inv = _gather_sort(xs, idx)
        h = mx.gather_mm(xs, w1.swapaxes(-1, -2), rhs_indices=ii, sorted_indices=sort)
        h = nn.gelu_approx(h[..., :I]) * h[..., I:]
        y = mx.gather_mm(h, w2.swapaxes(-1, -2), rhs_indices=ii, sorted_indices=sort)
        if sort:
            y = _scatter_unsort(y, inv, idx.shape)
        return (y.squeeze(-2) * wts[..., None]).sum(-2)

    def dense():
        h = (x @ w1.reshape(-1, D).T).reshape(N, E, 2 * I)
        h = nn.gelu_approx(h[..., :I]) * h[..., I:]
        y = h.transpose(1, 0, 2) @ w2.swapaxes(-1, -2)
        dw = mx.put_along_axis(mx.zeros((N, E)), idx.astype(mx.int32), wts, axis=-1)
        return (dw.T[:, :, None] * y).sum(0)

    def grouped():
        # rows sorted by expert, then one dense GEMM per expert over its contiguous rows; the
        # per-expert row counts come to the host (one sync per MoE block)
        order = mx.argsort(idx.flatten())
        sidx = idx.flatten()[order]
        counts = mx.zeros((E,), dtype=mx.int32).at[sidx].add(1)
        xs = x[order // K]
        mx.eval(xs, counts)
        ys, start = [], 0
        for e, c in enumerate(counts.tolist()):
            if c:
                h = xs[start:start + c] @ w1[e].T
                h = nn.gelu_approx(h[:, :I]) * h[:, I:]
                ys.append(h @ w2[e].T)
                start += c
        y = mx.concatenate(ys)[mx.argsort(order)].reshape(N, K, D)
        return (y * wts[..., None]).sum(-2)

    flop = 2 * N * K * 3 * D * I
    out = {}
    for name, fn in (("gathered, sorted", lambda: gathered(True)), ("gathered, unsorted", lambda: gathered(False)),
                     ("dense, all experts", dense), ("grouped GEMM per expert (host loop)", grouped)):
        if name.startswith("dense") and N * E * 2 * I * 4 > 2 * GiB:
            continue
        s = timeit(lambda: mx.eval(fn()), n)
        out[name] = dict(s=s, gflops=flop / s / 1e9)
    dense_flop = 2 * N * D * 2 * I  # one expert-sized dense matmul of all N tokens, for the BLAS rate
    s = timeit(lambda: mx.eval(x @ w1[0].T), n)
    out["BLAS rate (dense N x D x 2I)"] = dict(s=s, gflops=dense_flop / s / 1e9)
    return out


def sampler_ops(V, C=256, n=3):
    """Seconds of single vocabulary-sized passes on (1, C, V) float32 logits."""
    import mlx.core as mx

    x = mx.random.normal((1, C, V)) * 4
    mx.eval(x)
    lse = mx.logsumexp(x, axis=-1, keepdims=True)
    mx.eval(lse)
    ops = {
        "divide by temperature": lambda: x / 0.6,
        "logsumexp": lambda: mx.logsumexp(x, axis=-1, keepdims=True),
        "exp(x - lse)": lambda: mx.exp(x - lse),
        "argmax": lambda: mx.argmax(x, axis=-1),
        "gumbel noise": lambda: mx.random.gumbel(x.shape, key=mx.random.key(1)),
        "uniform noise": lambda: mx.random.uniform(shape=x.shape, key=mx.random.key(1)),
        "softmax": lambda: mx.softmax(x, axis=-1),
        "cumsum (inverse-CDF sampling)": lambda: mx.cumsum(x, axis=-1),
        "tanh (softcap)": lambda: mx.tanh(x / 30.0) * 30.0,
    }
    return {k: timeit(lambda f=f: mx.eval(f()), n) for k, f in ops.items()}


def section_profile(opts, rep):
    import mlx.core as mx

    from .loader import load_model

    rep.header(f"profile: where one decoder step goes, mid shape, float32, {opts.prompt}-token context")
    path = ensure_mid_checkpoint(opts.workdir)
    model = load_model(path)
    args = model.args
    ids = mx.array([random_prompt(opts.prompt, args.vocab_size, opts.seed)], dtype=mx.int32)
    C = args.canvas_length
    canvas = mx.random.randint(0, args.vocab_size, (1, C), dtype=mx.int32)
    t_enc = timeit(lambda: model.encode(ids, model.make_cache()), 2)
    cache = model.encode(ids, model.make_cache())
    committed = mx.random.randint(0, args.vocab_size, (1, C), dtype=mx.int32)

    def commit():
        c = model.make_cache()
        model.encode(ids, c)
        t = time.perf_counter()
        model.encode(committed, c)
        return time.perf_counter() - t

    t_commit = statistics.median([commit() for _ in range(3)])
    t_canvas_kv = timeit(lambda: decoder_cache(cache, C), 3)
    dcache = decoder_cache(cache, C)
    logits = model.decode(canvas, dcache)
    mx.eval(logits)
    temp, bound, key = mx.array(0.6), mx.array(0.1), mx.random.key(0)
    _, soft = sampler_step(model, logits, temp, bound, key)
    mx.eval(soft)
    t_dec = timeit(lambda: mx.eval(model.decode(canvas, dcache, soft_embeds=soft)), opts.repeat)
    layer = model.layers[0]
    classes = {"attention (projections, norms, RoPE, SDPA)": type(layer.self_attn), "dense MLP": type(layer.mlp),
               "router": type(layer.router), "experts (MoE)": type(layer.experts),
               "self-conditioning MLP + post-norm": type(model.model.decoder.self_conditioning)}
    acc = {}
    names = {v: k for k, v in classes.items()}
    with timed_calls(list(classes.values()), acc, key=lambda m: names[type(m)]):
        mx.eval(model.decode(canvas, dcache, soft_embeds=soft))
    acc2 = {}
    with timed_calls(list(classes.values()), acc2, key=lambda m: names[type(m)]):
        mx.eval(model.decode(canvas, dcache, soft_embeds=soft))
    acc = {k: min(acc[k], acc2.get(k, acc[k])) for k in acc}
    # the attention's four projections on their own (Linear calls inside attention modules)
    proj_ids = {id(getattr(l.self_attn, n)) for l in model.layers for n in ("q_proj", "k_proj", "v_proj", "o_proj")
                if n in l.self_attn}
    acc3 = {}
    lin = {type(getattr(layer.self_attn, "q_proj"))}
    with timed_calls(list(lin), acc3, key=lambda m: "proj" if id(m) in proj_ids else "other"):
        mx.eval(model.decode(canvas, dcache, soft_embeds=soft))
    att = "attention (projections, norms, RoPE, SDPA)"
    if att in acc and "proj" in acc3:
        acc["attention: q/k/v/o projections"] = acc3["proj"]
        acc["attention: norms, RoPE, K/V write, SDPA"] = max(acc.pop(att) - acc3["proj"], 0.0)
    lt, _ = per_layer_times(model, canvas, dcache, soft)
    h = model.decode_hidden(canvas, dcache, soft)
    mx.eval(h)
    t_head = timeit(lambda: mx.eval(model.lm_logits(h)), opts.repeat)
    samp = time_sampler(model, logits, opts.repeat)
    parts = dict(acc)
    parts["layers: norms, residuals, other"] = max(sum(lt) - sum(v for k, v in acc.items() if not k.startswith("self-conditioning")), 0)
    logits_f = logits * 1.0
    mx.eval(logits_f)
    t_cap = timeit(lambda: mx.eval(mx.tanh(logits_f / 30.0) * 30.0), opts.repeat)
    parts["final norm + LM head matmul"] = max(t_head - t_cap, 0.0)
    parts["logit softcap (tanh over the vocabulary)"] = t_cap
    parts["sampler (denoise_sample)"] = samp["denoise_sample"]
    if samp["sc_softmax"]:
        parts["self-conditioning softmax"] = samp["sc_softmax"]
    parts["self-conditioning probs @ embedding"] = samp["sc_matmul"]
    step = t_dec + samp["denoise_sample"] + samp["sc_total"]
    say(f"  decoder forward {t_dec * 1e3:.0f} ms (layers {sum(lt) * 1e3:.0f} ms: "
        + ", ".join(f"{x * 1e3:.0f}" for x in lt) + f"); + sampler and self-conditioning = {step * 1e3:.0f} ms per step")
    say(f"  {'part':<46} {'ms/step':>8} {'share':>7}")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        say(f"  {k:<46} {v * 1e3:>8.1f} {v / step:>7.1%}")
    say(f"  per canvas: prefix K/V buffers {t_canvas_kv * 1e3:.1f} ms, committing the canvas to the prompt "
        f"cache {t_commit * 1e3:.0f} ms; prompt encode {opts.prompt} tokens {t_enc * 1e3:.0f} ms "
        f"({opts.prompt / t_enc:.0f} tok/s)")
    say("  (module times are measured with each module's output evaluated on its own, which removes "
        "some overlap; their sum is within a few % of the forward)")
    experts_mid = expert_strategies(args.num_experts, args.hidden_size, args.moe_intermediate_size, C,
                                    args.top_k_experts)
    experts_full = expert_strategies(FULL_TEXT["num_experts"], FULL_TEXT["hidden_size"],
                                     FULL_TEXT["moe_intermediate_size"], C, FULL_TEXT["top_k_experts"], n=2)
    for label, ex in (("mid (E=%d, D=%d, I=%d)" % (args.num_experts, args.hidden_size, args.moe_intermediate_size), experts_mid),
                      ("full (E=128, D=2816, I=704)", experts_full)):
        say(f"  MoE block, {C} tokens top-8, {label}: " + "; ".join(
            f"{k} {v['s'] * 1e3:.0f} ms ({v['gflops']:.0f} GFLOP/s)" for k, v in ex.items()))
    ops_mid = sampler_ops(args.vocab_size)
    say(f"  one pass over (1, {C}, {args.vocab_size}) float32: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in ops_mid.items()))
    rep.save("profile", dict(decode_s=t_dec, step_s=step, parts=parts, layer_s=lt, encode_s=t_enc,
                             commit_s=t_commit, canvas_kv_s=t_canvas_kv, experts_mid=experts_mid,
                             experts_full=experts_full, sampler_ops=ops_mid, prompt=opts.prompt))


# ---------------------------------------------------------------------------------------------
# section: gpu (full shape)
# ---------------------------------------------------------------------------------------------
def section_gpu(opts, rep):
    import mlx.core as mx

    from .generation import stream_generate

    if not gpu_available() and not opts.allow_cpu:
        rep.header("gpu: full-shape speed on a GPU")
        say("  skipped: no GPU (MLX reports neither CUDA nor Metal). On an NVIDIA machine with mlx[cuda] "
            "this measures prefill tok/s, decoder step latency and decode tok/s at 16 fixed steps for "
            "the full 30-layer model in the mixed 4-bit recipe; `--allow-cpu --shape tiny` runs the same "
            "code here on a small model (a dry run).")
        return None
    if gpu_available():
        mx.set_default_device(mx.gpu)
    overrides = {"vocab_size": opts.vocab} if opts.vocab else {}
    args = make_args(SHAPES[opts.shape], layers=opts.layers, **overrides)
    rep.header(f"gpu: {opts.shape} shape, {args.num_hidden_layers} layers, vocab {args.vocab_size}, mixed 4-bit, "
               f"{opts.prompt}-token prompt, {opts.steps} fixed steps")
    default = default_quant(4)
    t = time.perf_counter()
    model = build_random_quantized(args, default, "mixed", verbose=False)
    W = param_bytes(model)
    say(f"  weights {W / GB:.3f} GB, built in {time.perf_counter() - t:.0f} s")
    V, C = args.vocab_size, args.canvas_length
    ids = random_prompt(opts.prompt, V, opts.seed)
    prompt = mx.array([ids], dtype=mx.int32)
    # warm-up: kernels for the prefill chunk shapes, the decoder and the sampler
    warm = model.make_cache()
    model.encode(prompt[:, : min(opts.chunk, opts.prompt)], warm, step=opts.chunk)
    del warm
    mx.reset_peak_memory()
    cache = model.make_cache()
    t = time.perf_counter()
    model.encode(prompt, cache, step=opts.chunk)
    t_prefill = time.perf_counter() - t
    dcache = decoder_cache(cache, C)
    canvas = mx.random.randint(0, V, (1, C), dtype=mx.int32)
    t_dec = timeit(lambda: mx.eval(model.decode(canvas, dcache)), opts.repeat, warmup=2)
    logits = model.decode(canvas, dcache)
    temp, bound, key = mx.array(0.6), mx.array(0.1), mx.random.key(0)
    _, soft = sampler_step(model, logits, temp, bound, key)
    mx.eval(logits, soft)

    def full_step():
        lg = model.decode(canvas, dcache, soft_embeds=soft)
        mx.eval(sampler_step(model, lg, temp, bound, key))

    t_step = timeit(full_step, opts.repeat, warmup=2)
    samp = time_sampler(model, logits, opts.repeat)
    del dcache, logits, soft
    # whole generation at fixed steps, through the public API
    for _ in stream_generate(model, None, ids[:256], max_tokens=C, max_denoising_steps=2,
                             confidence_threshold=NO_STOP, eos_token_ids=[], seed=1):
        pass
    r = None
    t = time.perf_counter()
    for r in stream_generate(model, None, ids, max_tokens=opts.max_tokens, max_denoising_steps=opts.steps,
                             confidence_threshold=NO_STOP, eos_token_ids=[], seed=0):
        pass
    total = time.perf_counter() - t
    canvas_ms = 1e3 * (r.generation_tokens / r.generation_tps) / (r.canvas + 1)
    say(f"  prefill: {opts.prompt} tokens in {t_prefill * 1e3:.0f} ms = {opts.prompt / t_prefill:.0f} tok/s")
    say(f"  decoder step latency (forward, logits) {t_dec * 1e3:.1f} ms; full step with sampler and "
        f"self-conditioning {t_step * 1e3:.1f} ms (sampler {samp['denoise_sample'] * 1e3:.1f} ms, "
        f"self-conditioning {samp['sc_total'] * 1e3:.1f} ms: {samp['total'] / t_step:.1%} of the step)")
    say(f"  generation: {r.generation_tokens} tokens, {r.decoder_forwards} decoder forwards, "
        f"{r.generation_tps:.1f} tok/s, {canvas_ms:.1f} ms per {C}-token canvas, prompt {r.prompt_tps:.0f} tok/s, "
        f"peak {r.peak_memory:.2f} GB ({total:.1f} s in all)")
    say(f"  vLLM H100 FP8 (bs 1, 16 steps, 4096 in): {VLLM_H100['canvas_ms']} ms per canvas "
        f"({VLLM_H100['step_ms']} ms/step), {VLLM_H100['tok_s']:.0f} tok/s")
    rep.save("gpu", dict(layers=args.num_hidden_layers, vocab=V, weights=W, prefill_s=t_prefill,
                         prefill_tps=opts.prompt / t_prefill, decode_step_s=t_dec, full_step_s=t_step,
                         sampler=samp, generation_tps=r.generation_tps, tokens=r.generation_tokens,
                         forwards=r.decoder_forwards, canvas_ms=canvas_ms, peak_gb=r.peak_memory))


# ---------------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(prog="python -m mlx_diffusiongemma.benchmark",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("section", choices=["weights", "build", "fullwidth", "peers", "profile", "gpu", "_reference"])
    p.add_argument("--json", help="append each section's figures to this file as JSON lines")
    p.add_argument("--workdir", default=os.environ.get("DG_BENCH_WORKDIR", "/tmp/dg-bench"),
                   help="where the mid-size checkpoint is written (default /tmp/dg-bench)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (fullwidth: 2; build, gpu: 30)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (fullwidth, gpu: 4096; peers, profile: 512)")
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (encode step)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="fullwidth weights (bfloat16 on a CPU: expert weights are cast to float32 per call, which inflates the transients)")
    p.add_argument("--steps", type=int, default=16, help="denoising steps per canvas")
    p.add_argument("--max-tokens", type=int, default=512, help="new tokens (peers, gpu)")
    p.add_argument("--ar-tokens", type=int, default=256, help="autoregressive tokens (peers)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", choices=["ours", "mlx-vlm", "ar", "reference"], help="peers to leave out")
    p.add_argument("--vocab", type=int, default=None, help="gpu: vocabulary override (testing on a CPU)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="full", help="gpu: model shape (tiny: CPU dry run)")
    p.add_argument("--allow-cpu", action="store_true", help="gpu: run on the CPU anyway")
    p.add_argument("--force", action="store_true", help="build: ignore the free-memory check")
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--wait-idle", type=float, default=300,
                   help="wait up to this many seconds for other processes to leave the CPUs idle (0: don't)")
    p.add_argument("--no-openblas", action="store_true", help="do not re-execute with OpenBLAS preloaded")
    o = p.parse_args(argv)
    defaults = {"fullwidth": (2, 4096), "build": (30, None), "gpu": (30, 4096), "peers": (None, 512),
                "profile": (None, 512), "weights": (None, None), "_reference": (None, 512)}
    dl, dp = defaults[o.section]
    if o.section == "gpu" and o.shape != "full":
        dl = SHAPES[o.shape]["num_hidden_layers"]
    o.layers = o.layers if o.layers is not None else dl
    o.prompt = o.prompt if o.prompt is not None else dp
    if o.section == "fullwidth" and o.repeat == 3:
        o.repeat = 2
    return o


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "_reference" not in argv:
        maybe_reexec_with_openblas(argv)
    opts = parse(argv)
    if opts.section == "_reference":
        return reference_main(opts)
    rep = Report(opts.json)
    if opts.wait_idle and opts.section not in ("weights",):
        wait_idle(opts.wait_idle)
    meter = CpuMeter()
    sections = {"weights": section_weights, "build": section_build, "fullwidth": section_fullwidth,
                "peers": section_peers, "profile": section_profile, "gpu": section_gpu}
    t = time.perf_counter()
    sections[opts.section](opts, rep)
    share = meter.others_share()
    busy = "" if share is None else f"; other processes used {share:.1%} of the CPUs meanwhile"
    say(f"  ({time.perf_counter() - t:.0f} s wall{busy})")
    rep.save(opts.section + ":run", {"wall_s": time.perf_counter() - t, "others_cpu_share": share})


if __name__ == "__main__":
    main()
