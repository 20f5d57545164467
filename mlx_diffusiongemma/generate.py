"""Command line: `python -m mlx_diffusiongemma.generate --model PATH --prompt "..."`."""

import sys
import types
from pathlib import Path

from .cli import (
    OneLineParser,
    add_distributed_arguments,
    add_model_argument,
    load_for_cli,
    run_cli,
)


def build_parser():
    p = OneLineParser(
        prog="mlx_diffusiongemma.generate",
        description="Generate text with DiffusionGemma (block text diffusion) on MLX.",
    )
    add_model_argument(p)
    p.add_argument(
        "--prompt",
        "-p",
        default=None,
        help="the prompt, or '-' to read it from stdin (default: hello, or the task's example)",
    )
    p.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=None,
        help="most tokens to generate (the last canvas is cut)",
    )
    p.add_argument("--system-prompt", default=None)
    p.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="feed the prompt without the chat template",
    )
    p.add_argument(
        "--enable-thinking", action="store_true", help="turn on the chat template's thinking mode"
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="maximum denoising steps per canvas")
    p.add_argument("--entropy-bound", type=float, default=None)
    p.add_argument("--t-min", type=float, default=None, help="temperature at the last step")
    p.add_argument("--t-max", type=float, default=None, help="temperature at the first step")
    p.add_argument("--stability-threshold", type=int, default=None)
    p.add_argument("--confidence-threshold", type=float, default=None)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="cast unquantized weights (CPU runs want float32)",
    )
    p.add_argument(
        "--suffix",
        default=None,
        help="infill: text after the gap; the prompt is the text before it (no chat template)",
    )
    p.add_argument(
        "--gap-length",
        type=int,
        default=None,
        help="infill: tokens in the gap (default: rest of the canvas)",
    )
    p.add_argument(
        "--infill-file",
        default=None,
        help="infill: a text file with <|gap|> or <|gap:N|> markers; prints it with the gaps filled",
    )
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="an image (path, http(s) URL or data URL) for the prompt; repeatable",
    )
    p.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="PATH",
        help="a video file for the prompt (frames as Gemma 4 lays them out; needs PyAV)",
    )
    p.add_argument(
        "--image-soft-tokens",
        type=int,
        default=None,
        choices=[70, 140, 280, 560, 1120],
        help="soft tokens per image at most (default: the checkpoint's, else 280)",
    )
    p.add_argument(
        "--visualize", action="store_true", help="show the canvas denoising live (needs a terminal)"
    )
    p.add_argument(
        "--verbose", action="store_true", help="print speed and memory figures at the end"
    )
    add_distributed_arguments(p)
    return p


def run(args):
    import mlx.core as mx

    from .examples.task import answer, prompt_text, read_task, show
    from .generation import print_stats, resolve_settings, stream_generate
    from .sampler import check_settings

    flags = dict(
        max_tokens=args.max_tokens,
        max_denoising_steps=args.steps,
        entropy_bound=args.entropy_bound,
        t_min=args.t_min,
        t_max=args.t_max,
        stability_threshold=args.stability_threshold,
        confidence_threshold=args.confidence_threshold,
    )
    check_settings(seed=args.seed, **flags)  # before the model loads
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    dtype = getattr(mx, args.dtype) if args.dtype else None
    model, tokenizer = load_for_cli(
        args.model, dtype, args.adapter_path, args.pipeline, args.pipeline_split
    )
    task = read_task(model.path)
    if task is not None:  # a task model (the Sudoku demo): its input checked, its output a grid
        prompt = prompt_text(task, prompt)
    elif prompt is None:
        prompt = "hello"
    settings = resolve_settings(model, **flags)  # the flags over the checkpoint's defaults
    sampler_kw = dict(
        settings=settings,
        seed=args.seed,
        images=args.image,
        videos=args.video,
        image_soft_tokens=args.image_soft_tokens,
    )
    if args.infill_file is not None or args.suffix is not None:
        from .infilling import Gap, infill

        if args.infill_file is not None:
            text = Path(args.infill_file).read_text()
        else:
            text = [prompt, Gap(args.gap_length), args.suffix]
        print(infill(model, tokenizer, text, **sampler_kw).text)
        return
    view = None
    if args.visualize and sys.stdout.isatty():
        from .visualize import CanvasView

        view = CanvasView(tokenizer, settings.max_denoising_steps)
    last, text = None, []
    for last in stream_generate(
        model,
        tokenizer,
        prompt,
        **sampler_kw,
        system_prompt=args.system_prompt,
        enable_thinking=args.enable_thinking,
        apply_chat_template=not args.ignore_chat_template,
        draft_callback=view.draft if view else None,
    ):
        text.append(last.text)
        if view:
            view.commit(last.text)
        elif task is None:
            print(last.text, end="", flush=True)
    if task is not None:
        grid = answer(task, "".join(text))
        print(" ".join(map(str, grid)))
        print(show(task, grid))
    else:
        print()
    if args.verbose and last is not None:
        print_stats(last)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_cli(run, args)


class _CallableModule(types.ModuleType):
    """`from mlx_diffusiongemma import generate` names the function `text.generate`, but once
    this module is imported Python binds the package's `generate` to the module: calling the
    module then calls the function, so the name works either way."""

    def __call__(self, *args, **kwargs):
        from .text import generate

        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
