"""Builds a small text checkpoint: random DiffusionGemma weights written by the transformers
reference plus a tiny byte-level BPE tokenizer with a Gemma 4 style chat template (the bundled
demo before it learned Sudoku). The tests that send free text build it (`text_demo`); its text
is noise.

    python tests/make_demo_checkpoint.py OUT_DIR
"""

import json
import shutil
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).parent))
from make_checkpoints import write_checkpoint  # noqa: E402

# The chat template and special tokens the Sudoku demo also uses (Gemma 4's turn markers).
from mlx_diffusiongemma.examples.sudoku import CHAT_TEMPLATE, SPECIALS  # noqa: E402

VOCAB = 512
CORPUS = [
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than "
    "complex. Complex is better than complicated. Flat is better than nested. Sparse is better "
    "than dense. Readability counts. Errors should never pass silently.",
    "Diffusion language models denoise a whole block of text at once. The sampler starts from "
    "random tokens, keeps the confident ones and re-noises the rest, step after step, until the "
    "canvas is stable. Then the canvas joins the prompt and the next block begins.",
    "The quick brown fox jumps over the lazy dog. Hello world! What is the capital of France? "
    "Paris is the capital of France. Write a poem about the sea. Explain why the sky is blue.",
    "user model system assistant: think about it, step by step. 0123456789 (){}[]<>=+-*/%.,;:!?",
]


def build_tokenizer(out: Path):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 4096,
            },
            indent=2,
        )
    )
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return tok.get_vocab_size()


def main(out_dir):
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vocab = build_tokenizer(tmp)
    eos = [SPECIALS.index("<eos>"), SPECIALS.index("<turn|>")]
    write_checkpoint(
        tmp,
        seed=1234,
        canvas_length=32,
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        sliding_window=64,
        eos_token_id=eos,
        pad_token_id=0,
        bos_token_id=2,
        generation=dict(
            max_new_tokens=64,
            max_denoising_steps=48,
            t_min=0.4,
            t_max=0.8,
            stability_threshold=1,
            confidence_threshold=0.005,
            eos_token_id=eos,
            pad_token_id=0,
            sampler_config={"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
        ),
    )
    (tmp / "README.md").write_text(
        "# DiffusionGemma demo checkpoint (random weights)\n\nA 6-layer, 64-wide DiffusionGemma with "
        "random weights and a 512-token BPE tokenizer, for trying the pipeline offline. Its output "
        "is noise. Use `--model google/diffusiongemma-26B-A4B-it` for the real model.\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "text-demo")  # never over the trained demo
