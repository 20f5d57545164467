"""The bundled demo: a small DiffusionGemma trained from scratch on this repo's trainer to solve
Sudoku. `python -m mlx_diffusiongemma.examples.sudoku train` reproduces it from a seed:

    data    write train/valid/test.jsonl of generated puzzles (prompt: the puzzle's digits,
            completion: the solution's, space-separated, 0 = blank)
    init    write a randomly initialised checkpoint with the task's tokenizer
    train   data + init (when missing) + `mlx_diffusiongemma.lora --fine-tune-type full`,
            resuming from the last checkpoint when one is there
    export  fuse the trained weights into a bf16 demo folder (the bundled one by default)

The architecture is the real model's in miniature: encoder and decoder sharing weights, MoE
beside the dense MLP, self-conditioning, sliding and full attention, the final softcap.
"""

import argparse
import json
import random
import sys
from pathlib import Path

from ..utils import ceil_div
from .sudoku_puzzles import box_shape, make_puzzle, to_text

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"]
WORDS = ["user", "model", "system", "thought"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n"
    "{% if enable_thinking is defined and enable_thinking %}<|channel>thought\n{% endif %}"
    "{% endif %}"
)
EOS = [SPECIALS.index("<eos>"), SPECIALS.index("<turn|>")]

# The model: 6 layers (5 sliding : 1 full, as the real model), 128 wide, 8 experts top-2.
TEXT_CONFIG = dict(
    attention_bias=False,
    attention_dropout=0.0,
    attention_k_eq_v=True,
    bos_token_id=2,
    eos_token_id=EOS,
    final_logit_softcapping=30.0,
    head_dim=32,
    hidden_activation="gelu_pytorch_tanh",
    hidden_size=128,
    initializer_range=0.02,
    intermediate_size=256,
    max_position_embeddings=1024,
    model_type="diffusion_gemma_text",
    moe_intermediate_size=128,
    num_attention_heads=4,
    num_experts=8,
    num_hidden_layers=6,
    num_key_value_heads=2,
    pad_token_id=0,
    rms_norm_eps=1e-6,
    sliding_window=64,
    tie_word_embeddings=True,
    top_k_experts=2,
    use_bidirectional_attention="vision",
    layer_types=["sliding_attention"] * 5 + ["full_attention"],
    per_layer_config={"5": {"head_dim": 32, "num_key_value_heads": 1}},
    rope_parameters={
        "full_attention": {
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
            "rope_type": "proportional",
        },
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
)


def vocabulary(n: int):
    return SPECIALS + WORDS + [str(d) for d in range(n + 1)]


def write_tokenizer(out: Path, n: int):
    """Word-level: every digit its own token (with or without spaces between them), the
    chat template's words and the special tokens; text decodes with spaces between tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(vocabulary(n))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 1024,
            },
            indent=2,
        )
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return len(vocab)


def canvas_length(n: int) -> int:
    return ceil_div(n * n + 1, 8) * 8  # the answer's digits and the end of the turn


def model_config(n: int) -> dict:
    text = dict(TEXT_CONFIG, vocab_size=len(vocabulary(n)))
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "canvas_length": canvas_length(n),
        "dtype": "float32",
        "tie_word_embeddings": True,
        "text_config": text,
    }


def generation_config(n: int) -> dict:
    return {
        "max_new_tokens": canvas_length(n),
        "max_denoising_steps": 48,
        "t_min": 0.4,
        "t_max": 0.8,
        "stability_threshold": 1,
        "confidence_threshold": 0.005,
        "eos_token_id": EOS,
        "pad_token_id": 0,
        "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
    }


def task_file(n: int) -> str:
    return json.dumps({"task": "sudoku", "size": n, "box": list(box_shape(n))}) + "\n"


def init_checkpoint(out: Path, n: int, seed: int):
    """A randomly initialised model (MLX's default initialisers) with the task's tokenizer."""
    import tempfile

    import mlx.core as mx

    from ..config import ModelArgs
    from ..model import Model
    from ..save import save_model

    mx.random.seed(seed)
    config = model_config(n)
    model = Model(ModelArgs.from_config(config))
    mx.eval(model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), n)
        (Path(tmp) / "generation_config.json").write_text(
            json.dumps(generation_config(n), indent=2)
        )
        save_model(model, config, out, source=Path(tmp), extra_files={"task.json": task_file(n)})


def write_data(
    out: Path, n: int, seed: int, train: int, valid: int, test: int, givens_range, test_givens: int
):
    """train/valid/test.jsonl; valid and test puzzles never appear in train."""
    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    lo, hi = givens_range
    for split, count, salt in (("test", test, 2), ("valid", valid, 1), ("train", train, 0)):
        rng = random.Random(seed * 1000 + salt)
        rows = []
        while len(rows) < count:
            givens = test_givens if split == "test" else rng.randint(lo, hi)
            made = make_puzzle(n, givens, rng)
            if made is None or tuple(made[0]) in seen:
                continue
            seen.add(tuple(made[0]))
            rows.append(json.dumps({"prompt": to_text(made[0]), "completion": to_text(made[1])}))
        tmp = out / f".{split}.jsonl.partial"
        tmp.write_text("\n".join(rows) + "\n")
        tmp.replace(out / f"{split}.jsonl")
        print(f"{split}: {count} puzzles", flush=True)


def latest_checkpoint(adapters: Path):
    found = sorted(adapters.glob("[0-9]" * 7 + "_adapters.safetensors"))
    return found[-1] if found else None


def train(a):
    from .. import lora

    work = Path(a.work_dir)
    data, base, adapters = work / "data", work / "init", work / "adapters"
    if not (data / "train.jsonl").exists():
        write_data(
            data,
            a.size,
            a.seed,
            a.train_puzzles,
            256,
            256,
            (a.min_givens, a.max_givens),
            a.size * a.size // 2,
        )
    if not (base / "config.json").exists():
        init_checkpoint(base, a.size, a.seed)
    argv = [
        "--model",
        str(base),
        "--train",
        "--data",
        str(data),
        "--fine-tune-type",
        "full",
        "--num-layers",
        "-1",
        "--batch-size",
        str(a.batch_size),
        "--iters",
        str(a.iters),
        "--adapter-path",
        str(adapters),
        "--seed",
        str(a.seed),
        "-c",
        str(work / "lora.yaml"),
        "--steps-per-report",
        "20",
        "--steps-per-eval",
        "100",
        "--val-batches",
        "4",
        "--save-every",
        "100",
    ]
    if a.grad_checkpoint:
        argv.append("--grad-checkpoint")
    (work / "lora.yaml").write_text(
        "optimizer: adamw\n"
        "optimizer_config:\n  adamw:\n    betas: [0.9, 0.99]\n    weight_decay: 0.01\n"
        f"lr_schedule:\n  name: cosine_decay\n  warmup: 100\n  warmup_init: 0.0\n"
        f"  arguments: [{a.learning_rate}, {a.iters}, {a.learning_rate / 10}]\n"
    )
    last = latest_checkpoint(adapters)
    if last is not None:
        argv += ["--resume-adapter-file", str(last)]
    lora.main(argv)


def export(a):
    """The trained weights fused into a standalone folder, in bfloat16."""
    import mlx.core as mx

    from ..loader import load_model, read_config
    from ..save import save_model
    from ..tuner.adapters import load_adapters
    from .task import read_task

    work = Path(a.work_dir)
    model = load_model(work / "init", dtype=mx.float32)
    load_adapters(model, work / "adapters")
    model.set_dtype(mx.bfloat16)
    config = dict(read_config(work / "init"), dtype="bfloat16")
    n = read_task(work / "init")["size"]
    readme = (
        f"# DiffusionGemma Sudoku demo ({n}x{n})\n\nA small DiffusionGemma (the full "
        "architecture in miniature) trained from random initialisation by "
        "`python -m mlx_diffusiongemma.examples.sudoku train`, fused and cast to bfloat16 "
        "by `... export`. Prompt: the puzzle's digits row by row, 0 for a blank; output: "
        "the solution's digits. See the project README.\n"
    )
    save_model(model, config, Path(a.out), source=work / "init", extra_files={"README.md": readme})
    print(f"wrote {a.out}")


def mx_on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mlx_diffusiongemma.examples.sudoku", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("command", choices=["data", "init", "train", "export"])
    p.add_argument("--size", type=int, default=6, help="grid size: 4, 6 or 9 (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--work-dir",
        default="sudoku_run",
        help="data, initial checkpoint, adapters and logs (default ./sudoku_run)",
    )
    p.add_argument("--train-puzzles", type=int, default=30000)
    p.add_argument("--min-givens", type=int, default=None)
    p.add_argument("--max-givens", type=int, default=None)
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument(
        "--out",
        default=str(Path(__file__).parent.parent / "demo"),
        help="export: the folder to write (default: the bundled demo)",
    )
    p.add_argument(
        "--no-openblas",
        action="store_true",
        help="Linux: do not re-run with OpenBLAS preloaded (MLX's CPU wheel's own BLAS "
        "is ~20x slower for training)",
    )
    a = p.parse_args(argv)
    from ..cli import one_line_errors

    if a.command in ("train", "data") and mx_on_cpu():
        from ..bench.common import maybe_reexec_with_openblas

        maybe_reexec_with_openblas(
            list(sys.argv[1:] if argv is None else argv),
            [sys.executable, "-m", "mlx_diffusiongemma.examples.sudoku"],
        )

    with one_line_errors():
        box_shape(a.size)
        cells = a.size * a.size
        a.min_givens = a.min_givens or cells // 3
        a.max_givens = a.max_givens or 2 * cells // 3
        work = Path(a.work_dir)
        if a.command == "data":
            write_data(
                work / "data",
                a.size,
                a.seed,
                a.train_puzzles,
                256,
                256,
                (a.min_givens, a.max_givens),
                cells // 2,
            )
        elif a.command == "init":
            init_checkpoint(work / "init", a.size, a.seed)
        elif a.command == "train":
            work.mkdir(parents=True, exist_ok=True)
            train(a)
        else:
            export(a)


if __name__ == "__main__":
    main()
