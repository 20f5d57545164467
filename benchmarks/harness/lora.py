"""Section lora: memory and speed of one LoRA training step.

Memory: the peak of one training step (value_and_grad of the diffusion loss and an Adam update,
compiled as mlx-lm's trainer compiles it; LoRA rank 8 on every linear, experts included, as
`tuner.adapters.prepare(model, "lora", -1, ...)` makes it) at the full model's width, batch 1,
a 512-token prompt and one 256-token canvas, with and without `--grad-checkpoint`
(tuner/checkpoint.py: mlx-lm's checkpointing, its backward pass ordered per layer). As `fullwidth`, it runs at reduced depth and extrapolates to the 30-layer model:

* the base weights are counted analytically at the mixed 4-bit recipe (what a Mac loads); they are
  measured here in float32 (MLX's CPU quantized matmuls are ~20x slower than its float32 matmuls,
  and its CPU gathered matmul takes float32 only), and their bytes are subtracted;
* the LoRA weights (float32, as mlx-lm makes them) and Adam's two moments are counted exactly at
  the full shape, from the adapted model built lazily (nothing allocated);
* what the step adds over weights, adapters and optimizer state (gradients, saved activations,
  the vocabulary-sized logits and their gradients) is measured in four configurations, each in its
  own process — a sliding + a full-attention layer, 2 sliding + 1 full, 1 sliding + 2 full (the
  last layer is always full, as in the reference's config), each at vocabulary 8192, and the
  first again at the real vocabulary (262144) — and fitted exactly by
  a + s x sliding layers + f x full layers + c x vocabulary, then evaluated at 25 sliding + 5 full
  layers and the real vocabulary: the vocabulary-sized tensors are measured at their real size,
  only the depth is extrapolated;
* the step runs what a Mac runs (mlx-lm's row layout for the experts, mx.fast attention): the
  CPU's own routes (expert tiles and the rest, backends/cpu.py) are switched off.

Depth (`--part depth`): the checkpointed step measured directly at all 30 layers and the real
vocabulary, no extrapolation: the layers of one attention type share their frozen float32
weights (build_shared_float), which only changes what the weights cost — a layer's activations,
gradients, adapters and Adam state are its own — so the whole model's step fits in this
machine's memory; the weights are then counted at the mixed 4-bit recipe as above. One run per
`--num-layers` value (mlx_lm.lora's default 16, and -1: all).

Activations are float32 here (bf16 on a Mac, except the logits, which are float32 on both): the
measured transient is an upper bound for a Mac.

Speed: iterations/s and tokens/s of LoRA training at the mid shape (float32, this CPU) through the
project's training path (`tuner.trainer.train`, i.e. mlx-lm's `train` with its compiled step), on
random examples; the first iteration (compilation) is not counted.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_diffusiongemma.bench.common import GB, ROOT, GiB, random_prompt, say
from mlx_diffusiongemma.bench.models import make_args, param_bytes, recipe_bytes
from mlx_diffusiongemma.bench.shapes import FULL_CANVAS, SHAPES

from .common import build_random_float, build_shared_float, layer_counts, mem_available

LORA_PARAMETERS = {"rank": 8, "scale": 20.0, "dropout": 0.0}
TARGET_GB = 24.0  # a 32 GB Mac trains
VOCABS = (8192, 262144)  # the full shape's: a small one and the real one
# (name, layer types): the configurations whose step peaks the fit is made from. The last layer is
# always a full-attention one (as the reference's config), and two layers at least: with one,
# the first layer is also the last, and what a step keeps per layer does not show apart from
# what it needs once (the recomputation of one layer under checkpointing).
CONFIGS = [
    ("sliding + full", ["sliding_attention", "full_attention"]),
    ("2 sliding + full", ["sliding_attention"] * 2 + ["full_attention"]),
    ("sliding + 2 full", ["sliding_attention"] + ["full_attention"] * 2),
]


def canvas_for(shape):
    """The real canvas (256); the tiny shape, a smoke test, gets 32."""
    return 32 if shape == "tiny" else FULL_CANVAS


# ---------------------------------------------------------------------------------------------
# one measurement (in its own process: grad checkpointing patches the layer class)
# ---------------------------------------------------------------------------------------------
def example_batch(prompt_len, canvas, vocab, batch=1, seed=0):
    """A Batch of `batch` random examples (prompt, one canvas of response), noise drawn as the
    trainer draws it."""
    import numpy as np

    from mlx_diffusiongemma.tuner.trainer import DiffusionArgs, draw_noise, make_batch

    diff = DiffusionArgs(canvas_length=canvas, fill_token=1, vocab_size=vocab)
    examples = [
        (random_prompt(prompt_len, vocab, seed + i), random_prompt(canvas, vocab, seed + 100 + i))
        for i in range(batch)
    ]
    return diff, make_batch(examples, draw_noise(np.random.default_rng(seed), examples, diff), diff)


def adapted_bytes(model):
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))


def measure_step(case):
    """Peaks of one LoRA step on a random float32 model, plain and then with --grad-checkpoint's
    checkpointing (tuner/checkpoint.py, patched in, then undone); returns their figures."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_diffusiongemma.backends.cpu_memory import keep_freed_memory
    from mlx_diffusiongemma.tuner.adapters import prepare
    from mlx_diffusiongemma.tuner.checkpoint import grad_checkpoint
    from mlx_diffusiongemma.tuner.trainer import make_loss

    keep_freed_memory()
    # What a Mac runs: the default backend (mlx-lm's row layout for the experts, mx.fast
    # attention), none of the CPU's routes. The CPU's expert tiles pad rows and keep tile-sized
    # temporaries that no Mac allocates (measured: ~2x the step's per-layer memory).
    from mlx_diffusiongemma import backends

    backends.select(mx.gpu)  # this process only measures (run_case runs it alone)
    text = SHAPES[case["shape"]]
    args = make_args(
        text,
        layers=len(case["layer_types"]),
        canvas_length=case["canvas"],
        vocab_size=case["vocab"],
        layer_types=case["layer_types"],
    )
    mx.random.seed(0)
    if case.get("share"):
        model = build_shared_float(args, mx.float32)
    else:
        model = build_random_float(args, mx.float32, verbose=False)
    W = param_bytes(model)
    prepare(model, "lora", case.get("num_layers", -1), dict(LORA_PARAMETERS))
    mx.eval(model.parameters())
    A = adapted_bytes(model)
    opt = optim.Adam(learning_rate=1e-5)
    opt.init(model.trainable_parameters())
    mx.eval(opt.state)
    diff, batch = example_batch(case["prompt"], args.canvas_length, args.vocab_size)
    mx.eval(*batch)
    model.train()
    out = dict(case, weights=W, adapters=A)
    for ckpt in case.get("checkpoint", (False, True)):
        undo = grad_checkpoint(model.layers[0]) if ckpt else lambda: None
        try:
            loss_value_and_grad = nn.value_and_grad(model, make_loss(diff))
            state = [model.state, opt.state, mx.random.state]

            def step(*b):  # mlx-lm's step, without gradient accumulation
                (lvalue, toks), grad = loss_value_and_grad(model, *b)
                opt.update(model, grad)
                return lvalue, toks

            if case["compile"]:
                step = partial(mx.compile, inputs=state, outputs=state)(step)
            mx.clear_cache()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            t = time.perf_counter()
            lvalue, _ = step(*batch)
            mx.eval(state, lvalue)
            dt = time.perf_counter() - t
            peak = mx.get_peak_memory()
        finally:
            undo()
        key = "checkpoint" if ckpt else "plain"
        out[key] = dict(
            optimizer=base - W - A, peak=peak, transient=peak - base, step_s=dt, loss=lvalue.item()
        )
    return out


def run_case(case, timeout=3600):
    """measure_step in a child process (the OpenBLAS preload is inherited)."""
    cmd = [sys.executable, "-m", "benchmarks.harness.lora", json.dumps(case)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(
            f"lora: the measurement {case} failed (exit {p.returncode}):\n{p.stderr[-3000:]}"
        )
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# exact adapter bytes at a shape (lazily built, nothing evaluated)
# ---------------------------------------------------------------------------------------------
def lora_layout(args):
    """(adapter bytes, adapter parameters) of `prepare(model, "lora", -1, rank 8)` at `args`."""
    from mlx.utils import tree_flatten

    from mlx_diffusiongemma.model import Model
    from mlx_diffusiongemma.tuner.adapters import prepare

    model = Model(args)
    prepare(model, "lora", -1, dict(LORA_PARAMETERS))
    flat = tree_flatten(model.trainable_parameters())
    n = sum(math.prod(v.shape) for _, v in flat)
    b = sum(math.prod(v.shape) * v.dtype.size for _, v in flat)
    del model
    return b, n


def fit(rows, full_layers):
    """Solves a + s*S + f*F + c*V for the four measurements (three: with f = s); returns
    (a, s, f, c) and the value at `full_layers` = (S, F, V)."""
    import numpy as np

    y = np.array([r["transient"] for r in rows], dtype=float)
    S, F, V = full_layers
    if len(rows) == 3:
        X = np.array([[1.0, r["sliding"] + r["full"], r["vocab"]] for r in rows])
        a, s, c = np.linalg.solve(X, y)
        coef = np.array([a, s, s, c])
    else:
        coef = np.linalg.solve(
            np.array([[1.0, r["sliding"], r["full"], r["vocab"]] for r in rows]), y
        )
    return coef, float(coef @ np.array([1.0, S, F, V]))


# ---------------------------------------------------------------------------------------------
# section
# ---------------------------------------------------------------------------------------------
def memory_part(opts, rep):
    shape = opts.shape
    text = SHAPES[shape]
    full = make_args(text, canvas_length=canvas_for(shape))
    V = full.vocab_size
    vocabs = VOCABS if shape == "full" else (max(V // 8, 64), max(V // 2, 128))
    if opts.vocab:
        vocabs = (vocabs[0], opts.vocab)
    prompt = opts.prompt
    say(
        f"  memory: {shape} width, batch 1, {prompt}-token prompt, one {full.canvas_length}-token canvas, "
        f"LoRA rank {LORA_PARAMETERS['rank']} on every linear (experts included), Adam; weights and activations "
        f"float32 here"
    )
    est = 13e9 if shape == "full" else 0
    avail = mem_available()
    if avail is not None and avail < est and not opts.force:
        say(
            f"  skipped: the three-layer measurements need ~{est / GB:.1f} GB free, {avail / GB:.1f} GB available "
            "(--force to try anyway)"
        )
        return None
    configs = CONFIGS[:2] if opts.quick else CONFIGS
    cases = [(name, types, vocabs[0]) for name, types in configs[:2]] + [
        (CONFIGS[0][0], CONFIGS[0][1], vocabs[1])
    ]
    cases += [(name, types, vocabs[0]) for name, types in configs[2:]]
    compiled = not opts.no_compile
    results = {False: [], True: []}
    for name, types, vocab in cases:
        say(f"    measuring {name}, vocab {vocab} ...")
        r = run_case(
            dict(
                shape=shape,
                layer_types=types,
                vocab=vocab,
                prompt=prompt,
                canvas=full.canvas_length,
                compile=compiled,
            )
        )
        for ckpt in (False, True):
            row = dict(
                r[("checkpoint" if ckpt else "plain")],
                weights=r["weights"],
                adapters=r["adapters"],
                vocab=vocab,
                sliding=types.count("sliding_attention"),
                full=types.count("full_attention"),
                name=name,
            )
            results[ckpt].append(row)
            say(
                f"    {name:<15} vocab {vocab:>6} {'checkpointed' if ckpt else 'plain':<12}: peak "
                f"{row['peak'] / GB:6.2f} GB = weights {row['weights'] / GB:.2f} + adapters {row['adapters'] / GB:.3f} "
                f"+ Adam {row['optimizer'] / GB:.3f} + step {row['transient'] / GB:.3f} GB ({row['step_s']:.0f} s)"
            )
    S30 = sum(full.is_sliding(i) for i in range(full.num_hidden_layers))
    F30 = full.num_hidden_layers - S30
    W30 = recipe_bytes(full, "mixed", 4)[0]
    A30, n30 = lora_layout(full)
    O30 = 2 * A30  # Adam: first and second moments, float32 like the adapters
    figures = dict(
        shape=shape,
        prompt=prompt,
        canvas=full.canvas_length,
        vocab=V,
        vocabs=vocabs,
        compiled=compiled,
        weights30_mixed4=W30,
        adapters30=A30,
        adapter_params30=n30,
        optimizer30=O30,
    )
    say(
        f"  30-layer constants: mixed 4-bit weights {W30 / GB:.2f} GB (analytic, bf16 scales), LoRA "
        f"{n30 / 1e6:.1f}M parameters = {A30 / GB:.3f} GB (float32), Adam moments {O30 / GB:.3f} GB"
    )
    for ckpt, rows in results.items():
        (a, s, f, c), T30 = fit(rows, (S30, F30, V))
        peak30 = W30 + A30 + O30 + T30
        label = "with --grad-checkpoint" if ckpt else "without grad checkpointing"
        vocab_part = c * V
        per_layer = (
            f"{s / GB:.3f} GB per layer (full-attention layers taken as sliding ones: --quick)"
            if len(rows) == 3
            else f"{s / GB:.3f} GB per sliding layer + {f / GB:.3f} GB per full layer"
        )
        say(
            f"  {label}: step = {a / GB:.3f} GB + {per_layer}"
            f" + {c / 1e3:.1f} KB per vocabulary entry ({vocab_part / GB:.2f} GB at {V})"
        )
        say(
            f"    extrapolated peak, {S30}+{F30} layers, vocab {V}: weights {W30 / GB:.2f} + adapters {A30 / GB:.2f} "
            f"+ Adam {O30 / GB:.2f} + step {T30 / GB:.2f} = {peak30 / GB:.2f} GB ({peak30 / GiB:.2f} GiB); "
            f"target <= {TARGET_GB:.0f} GB: {'met' if peak30 / GB <= TARGET_GB else 'missed'} by "
            f"{abs(TARGET_GB - peak30 / GB):.2f} GB"
        )
        figures["checkpoint" if ckpt else "plain"] = dict(
            runs=rows,
            fit=dict(a=a, per_sliding=s, per_full=f, per_vocab=c),
            step30=T30,
            peak30=peak30,
        )
    rows = results[False]
    ratio = statistics.mean(r["optimizer"] / r["adapters"] for r in rows)
    say(
        f"  (measured Adam state / adapter bytes = {ratio:.3f}; weights measured in float32 are replaced by the "
        f"analytic mixed 4-bit bytes; step = peak - weights - adapters - Adam state, float32 activations: an "
        f"upper bound for bf16 on a Mac; the step {'compiled as mlx-lm compiles it' if compiled else 'not compiled (--no-compile: an upper bound, mx.compile fuses temporaries away)'})"
    )
    rep.save("lora:memory", figures)
    return figures


def depth_part(opts, rep):
    """The checkpointed step measured at the real depth and vocabulary, not extrapolated: the
    layers of one attention type share their frozen float32 weights (build_shared_float), so the
    30-layer step fits in this machine's memory; the weights are then counted at the mixed 4-bit
    recipe. One run per --num-layers value."""
    shape = opts.shape
    full = make_args(SHAPES[shape], canvas_length=canvas_for(shape))
    V, prompt = full.vocab_size, opts.prompt
    W30 = recipe_bytes(full, "mixed", 4)[0]
    S30, F30 = layer_counts(full)
    say(
        f"  depth: {shape} shape, all {full.num_hidden_layers} layers ({S30} sliding + {F30} full), "
        f"vocab {V}, batch 1, {prompt}-token prompt, one {full.canvas_length}-token canvas, LoRA "
        f"rank {LORA_PARAMETERS['rank']}, Adam, --grad-checkpoint; float32, the layers of one "
        "attention type sharing their frozen weights"
    )
    figures = dict(shape=shape, prompt=prompt, canvas=full.canvas_length, vocab=V, runs=[])
    for n in opts.num_layers:
        if not (n == -1 or 1 <= n <= full.num_hidden_layers):
            say(
                f"    --num-layers {n:>3}: skipped (the {shape} shape has {full.num_hidden_layers} layers)"
            )
            continue
        say(f"    measuring --num-layers {n} ...")
        r = run_case(
            dict(
                shape=shape,
                layer_types=full.layer_types,
                vocab=V,
                prompt=prompt,
                canvas=full.canvas_length,
                compile=not opts.no_compile,
                share=True,
                num_layers=n,
                checkpoint=[True],
            ),
            timeout=4 * 3600,
        )
        c = r["checkpoint"]
        peak = W30 + r["adapters"] + c["optimizer"] + c["transient"]
        say(
            f"    --num-layers {n:>3}: measured peak {c['peak'] / GB:.2f} GB = shared float32 "
            f"weights {r['weights'] / GB:.2f} + adapters {r['adapters'] / GB:.3f} + Adam "
            f"{c['optimizer'] / GB:.3f} + step {c['transient'] / GB:.3f} GB ({c['step_s']:.0f} s)"
        )
        say(
            f"      with the mixed 4-bit weights ({W30 / GB:.2f} GB): peak {peak / GB:.2f} GB "
            f"({peak / GiB:.2f} GiB); target <= {TARGET_GB:.0f} GB: "
            f"{'met' if peak / GB <= TARGET_GB else 'missed'} by {abs(TARGET_GB - peak / GB):.2f} GB"
        )
        figures["runs"].append(dict(r, num_layers=n, weights30_mixed4=W30, peak30=peak))
    rep.save("lora:depth", figures)
    return figures


def speed_part(opts, rep):
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs

    from mlx_diffusiongemma.tuner.adapters import prepare
    from mlx_diffusiongemma.tuner.trainer import DiffusionArgs, train

    shape = "tiny" if opts.shape == "tiny" else "mid"
    args = make_args(SHAPES[shape], canvas_length=canvas_for(shape))
    C = args.canvas_length
    B, P, n = opts.batch_size, opts.train_prompt, opts.repeat
    say(
        f"  speed: {shape} shape ({args.num_hidden_layers} layers, hidden {args.hidden_size}, vocab "
        f"{args.vocab_size}), float32, batch {B}, {P}-token prompts, one {C}-token canvas each, LoRA rank 8, "
        f"Adam, through tuner.trainer.train (mlx-lm's compiled step"
        f"{', --grad-checkpoint' if opts.grad_checkpoint else ''}); {n} timed iterations after one untimed"
    )
    mx.random.seed(0)
    model = build_random_float(args, mx.float32, verbose=False)
    prepare(model, "lora", -1, dict(LORA_PARAMETERS))
    mx.eval(model.parameters())
    data = [
        (random_prompt(P, args.vocab_size, i), random_prompt(C, args.vocab_size, 1000 + i))
        for i in range(B)
    ]
    diff = DiffusionArgs(canvas_length=C, fill_token=1, vocab_size=args.vocab_size)
    opt = optim.Adam(learning_rate=1e-5)
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "log.jsonl"
        targs = TrainingArgs(
            batch_size=B,
            iters=n + 1,
            steps_per_report=1,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=P + C,
            grad_checkpoint=opts.grad_checkpoint,
        )
        devnull = open(os.devnull, "w")
        stdout = sys.stdout
        sys.stdout = devnull  # mlx-lm's progress display and the per-iteration lines
        try:
            train(model, opt, data, None, targs, diff, Path(d), log=log)
        finally:
            sys.stdout = stdout
            devnull.close()
        records = [json.loads(l) for l in log.read_text().splitlines()]
    timed = [r for r in records if r.get("iteration", 0) >= 2 and "it_per_s" in r]
    secs = [1 / r["it_per_s"] for r in timed]
    it_s = len(secs) / sum(secs)
    tokens = B * (P + C)
    tok_s = tokens * it_s
    first = 1 / records[0]["it_per_s"]
    peak = max(r["peak_memory_gb"] for r in records)
    say(
        f"  LoRA step at the {shape} shape: {it_s:.3f} it/s, {tok_s:.1f} tokens/s ({tokens} tokens a step: prompt "
        f"+ canvas, as the trainer counts them; steps {', '.join(f'{s:.1f}' for s in secs)} s; first step with "
        f"compilation {first:.1f} s); peak {peak:.2f} GB"
    )
    figures = dict(
        shape=shape,
        batch=B,
        prompt=P,
        canvas=C,
        iterations=n,
        step_s=secs,
        first_step_s=first,
        it_per_s=it_s,
        tokens_per_s=tok_s,
        tokens_per_step=tokens,
        grad_checkpoint=opts.grad_checkpoint,
        peak_gb=peak,
    )
    rep.save("lora:speed", figures)
    return figures


def section_lora(opts, rep):
    rep.header(
        f"lora: LoRA training step, peak memory at {opts.shape} width (extrapolated to 30 layers, "
        f"and measured at 30 layers sharing their weights) and speed at the "
        f"{'tiny' if opts.shape == 'tiny' else 'mid'} shape"
    )
    out = {}
    if opts.part in ("all", "memory"):
        out["memory"] = memory_part(opts, rep)
    if opts.part in ("all", "depth"):
        out["depth"] = depth_part(opts, rep)
    if opts.part in ("all", "speed"):
        out["speed"] = speed_part(opts, rep)
    return out


if __name__ == "__main__":
    print(json.dumps(measure_step(json.loads(sys.argv[1]))))
