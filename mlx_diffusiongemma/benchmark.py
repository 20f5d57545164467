"""`python -m mlx_diffusiongemma.benchmark --model M`: a checkpoint's speed and memory on this
machine, measured as `mlx_lm.benchmark` measures them (random prompt tokens, EOS ignored), with
what block diffusion adds: denoising steps per canvas and tokens per decoder forward.

The 26B's cost without downloading it: `weights` (its resident bytes per quantization recipe,
counted from the model's shapes) and `gpu` (the same measurement on random full-shape weights in
the mixed 4-bit recipe, on a CUDA or Metal GPU). Shape studies, LoRA memory, the peers and the
Sudoku table are the project's harness: `python -m benchmarks.harness SECTION` in a checkout.
On Linux the command re-runs itself with OpenBLAS preloaded when installed (`--no-openblas`
keeps the MLX wheel's slower CPU BLAS)."""

import sys
import time

from .bench.common import GB, GiB, Report, maybe_reexec_with_openblas, say
from .bench.models import (
    RECIPES,
    build_random_quantized,
    default_quant,
    gpu_section_args,
    make_args,
    param_bytes,
    recipe_bytes,
)
from .bench.shapes import NO_STOP, SHAPES, TARGETS, VLLM_H100
from .cli import DEMO_MODEL, OneLineParser, add_model_argument, run_cli

SECTIONS = ("weights", "gpu")
HARNESS = ("build", "fullwidth", "lora", "sudoku", "peers", "profile", "graph", "serve", "vision")
# -p, -g, -n, --steps of --model runs (mlx-lm's) and of `gpu` (vLLM's: a long prompt, 16 steps)
DEFAULTS = {None: (512, 1024, 5, None), "weights": (), "gpu": (4096, 512, 3, 16)}
KEYS = ("prompt_tps", "generation_tps", "steps_per_canvas", "tokens_per_forward", "step_ms")


def setup_arg_parser():
    p = OneLineParser(prog="mlx_diffusiongemma.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("section", nargs="?", choices=SECTIONS, help="default: measure --model")
    add_model_argument(p)
    p.add_argument("-p", "--prompt-tokens", "--prompt", type=int, help="512; gpu: 4096")
    p.add_argument("-g", "--generation-tokens", "--max-tokens", type=int, help="1024; gpu: 512")
    p.add_argument("-b", "--batch-size", type=int, default=1, help="prompts generated together")
    p.add_argument("-n", "--num-trials", "--repeat", type=int, help="timed runs (5; gpu: 3)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps, every canvas running all of them (default: the checkpoint's "
        "sampler, which ends a canvas once it is confident; gpu: 16)",
    )
    p.add_argument("--prefill-step-size", "--chunk", type=int, default=2048)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append the figures to this file as JSON lines")
    p.add_argument("--no-openblas", action="store_true", help="keep the MLX wheel's CPU BLAS")
    gpu = p.add_argument_group("gpu")
    gpu.add_argument("--shape", choices=sorted(SHAPES), default="full", help="tiny: a dry run")
    gpu.add_argument("--layers", type=int, default=None, help="decoder layers (default: all)")
    gpu.add_argument("--vocab", type=int, default=None, help="vocabulary override")
    gpu.add_argument("--allow-cpu", action="store_true", help="run without a GPU")
    return p


def measure(model, tokenizer, args, rep, section):
    """Times `args.num_trials` generations after one warm-up: `stream_generate` for one
    prompt, `batch_generate` for several; prints each trial and the averages."""
    import mlx.core as mx

    from . import batch_generate, stream_generate

    mx.random.seed(args.seed)
    V, C = model.args.vocab_size, model.args.canvas_length
    shape = (args.batch_size, args.prompt_tokens)
    prompts = mx.random.randint(0, V, shape).tolist()
    kw = dict(
        max_tokens=args.generation_tokens,
        eos_token_ids=[],  # every trial generates all its tokens
        prefill_step_size=args.prefill_step_size,
        seed=args.seed,
    )
    if args.steps is not None:
        kw.update(max_denoising_steps=args.steps, confidence_threshold=NO_STOP)
    canvases = -(-args.generation_tokens // C)

    def run():
        if args.batch_size == 1:
            for r in stream_generate(model, tokenizer, prompts[0], **kw):
                pass
        else:
            r = batch_generate(model, tokenizer, prompts, **kw)
        forwards = max(r.decoder_forwards, 1)
        return dict(
            prompt_tps=r.prompt_tps,
            generation_tps=r.generation_tps,
            steps_per_canvas=r.decoder_forwards / canvases,
            tokens_per_forward=r.generation_tokens / forwards,
            step_ms=1e3 * r.generation_tokens / r.generation_tps / forwards,
            peak_memory=r.peak_memory,
        )

    say("Running warmup..")
    run()
    say(
        f"Timing with prompt_tokens={args.prompt_tokens}, generation_tokens="
        f"{args.generation_tokens}, batch_size={args.batch_size}, steps="
        f"{args.steps or 'the sampler'}, canvas={C}."
    )
    trials = []
    for i in range(args.num_trials):
        tic = time.perf_counter()
        r = run()
        r["total_time"] = time.perf_counter() - tic
        trials.append(r)
        say(f"Trial {i + 1}:  " + ", ".join(f"{k}={v:.3f}" for k, v in r.items()))
    avg = {k: sum(t[k] for t in trials) / len(trials) for k in (*KEYS, "peak_memory")}
    say("Averages: " + ", ".join(f"{k}={v:.3f}" for k, v in avg.items()))
    rep.save(section, dict(options=vars(args), trials=trials, averages=avg))
    return avg


def section_model(args, rep):
    import mlx.core as mx

    from . import load

    dtype = getattr(mx, args.dtype) if args.dtype else None
    model, tokenizer = load(args.model or DEMO_MODEL, dtype, args.adapter_path)
    rep.header(f"model: {model.path}")
    return measure(model, tokenizer, args, rep, "model")


def section_weights(args, rep):
    rep.header("weights: resident text-model weight bytes, full shape (analytic)")
    full = make_args(SHAPES["full"])
    say(f"  {'recipe':<84} {'bytes':>15} {'GB':>7} {'GiB':>7}")
    figures = {}
    for label, recipe, bits in RECIPES:
        total, cats = recipe_bytes(full, recipe, bits)
        say(f"  {label:<84} {total:>15,} {total / GB:>7.2f} {total / GiB:>7.2f}")
        figures[label] = {"bytes": total, "by_category": cats}
    total, cats = figures[RECIPES[0][0]].values()
    say("  mixed 4-bit by part: " + ", ".join(f"{c} {b / GB:.3f} GB" for c, b in cats.items()))
    t = TARGETS["resident_4bit_gb"]
    verdict = "met" if total / GB <= t else "missed"
    say(
        f"  target <= {t:.0f} GB resident at 4 bits: mixed {total / GB:.2f} GB ({verdict} by "
        f"{abs(t - total / GB):.2f} GB); scales and biases in bf16, group 64, affine; without "
        "the vision tower"
    )
    rep.save("weights", {"recipes": figures})
    return figures


def section_gpu(args, rep):
    title = "gpu: full-shape speed on a GPU"
    model_args = gpu_section_args(rep, title, args.shape, args.layers, args.vocab, args.allow_cpu)
    if model_args is None:
        return None
    rep.header(
        f"gpu: {args.shape} shape, {model_args.num_hidden_layers} layers, vocab "
        f"{model_args.vocab_size}, mixed 4-bit, random weights"
    )
    t = time.perf_counter()
    model = build_random_quantized(model_args, default_quant(4), "mixed", verbose=False)
    say(f"  weights {param_bytes(model) / GB:.3f} GB, built in {time.perf_counter() - t:.0f} s")
    avg = measure(model, None, args, rep, "gpu")
    C = model_args.canvas_length
    say(
        f"  {avg['step_ms']:.1f} ms per denoising step, {avg['step_ms'] * avg['steps_per_canvas']:.1f}"
        f" ms per {C}-token canvas; vLLM H100 FP8 (bs 1, 16 steps, 4096 in): "
        f"{VLLM_H100['canvas_ms']} ms per canvas ({VLLM_H100['step_ms']} ms/step), "
        f"{VLLM_H100['tok_s']:.0f} tok/s"
    )
    return avg


def run(args):
    defaults = zip(
        ("prompt_tokens", "generation_tokens", "num_trials", "steps"), DEFAULTS[args.section]
    )
    for flag, value in defaults:
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    for flag in ("prompt_tokens", "generation_tokens", "batch_size", "num_trials", "steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    section = {None: section_model, "weights": section_weights, "gpu": section_gpu}
    section[args.section](args, Report(args.json))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in HARNESS:
        print(
            f"error: {argv[0]} is a section of the project's measuring harness: from a "
            f"checkout's root, python -m benchmarks.harness {' '.join(argv)}",
            file=sys.stderr,
        )
        return 2
    args = setup_arg_parser().parse_args(argv)
    maybe_reexec_with_openblas(argv, [sys.executable, "-m", "mlx_diffusiongemma.benchmark"])
    return run_cli(run, args)


if __name__ == "__main__":
    sys.exit(main())
