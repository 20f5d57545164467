"""Fine-tuning end to end on a tiny checkpoint: the command, adapters, resume, fuse (the fused
folder loads in the transformers reference as it is, with the logits of model + adapter), errors."""

import json
import random
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma import fuse as fuse_cli
from mlx_diffusiongemma import load, load_model, lora
from mlx_diffusiongemma.examples.sudoku import EOS, vocabulary, write_tokenizer
from mlx_diffusiongemma.fuse import fuse

CANVAS = 16


@pytest.fixture(scope="module")
def task_model(tmp_path_factory):
    """A tiny reference checkpoint with a digits tokenizer (words, digits, chat tokens)."""
    from make_checkpoints import write_checkpoint

    path = tmp_path_factory.mktemp("task_model")
    write_checkpoint(
        path,
        seed=5,
        canvas_length=CANVAS,
        vocab_size=len(vocabulary(9)),
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=2,
        generation=dict(eos_token_id=EOS, max_new_tokens=CANVAS),
    )
    write_tokenizer(path, 9)
    return path


def write_split(folder, name, n, seed, kind="completions"):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [str(rng.randint(1, 9)) for _ in range(6)]
        if kind == "completions":
            rows.append({"prompt": " ".join(digits), "completion": " ".join(reversed(digits))})
        elif kind == "chat":
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": " ".join(digits)},
                        {"role": "assistant", "content": " ".join(sorted(digits))},
                    ]
                }
            )
        else:
            rows.append({"text": " ".join(digits * 4)})
    (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_split(folder, "train", 64, 0)
    write_split(folder, "valid", 16, 1)
    write_split(folder, "test", 16, 2)
    return folder


def run_lora(model, data, adapters, *extra):
    lora.main(
        [
            "--model",
            str(model),
            "--train",
            "--data",
            str(data),
            "--adapter-path",
            str(adapters),
            "--batch-size",
            "8",
            "--steps-per-report",
            "2",
            "--val-batches",
            "2",
            "--seed",
            "3",
            *map(str, extra),
        ]
    )


def log(adapters):
    return [json.loads(l) for l in (adapters / "train_log.jsonl").read_text().splitlines()]


def reference_logits(folder, ids, canvas):
    """Logits of the transformers reference loaded from `folder` as it is: what a fused folder
    must be for the engines that read Google's checkpoint (transformers, vLLM)."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    ref, info = DiffusionGemmaForBlockDiffusion.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    with torch.no_grad():
        out = ref.eval()(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(canvas))
    return out.logits.numpy()


def test_lora_training_lowers_validation_loss(task_model, data, tmp_path, capsys):
    adapters = tmp_path / "adapters"
    run_lora(
        task_model,
        data,
        adapters,
        "--iters",
        40,
        "--learning-rate",
        3e-3,
        "--steps-per-eval",
        20,
        "--num-layers",
        -1,
        "--save-every",
        20,
    )
    out = capsys.readouterr().out
    assert "diffusion" in out and "AR" in out and "tokens/s" in out and "peak mem" in out
    vals = [r["val_loss"] for r in log(adapters) if "val_loss" in r]
    assert len(vals) >= 2 and vals[-1] < vals[0] - 0.1, vals
    for f in (
        "adapters.safetensors",
        "adapter_config.json",
        "0000020_adapters.safetensors",
        "0000020_optimizer.safetensors",
    ):
        assert (adapters / f).is_file(), f
    assert not list(adapters.glob(".*"))  # no temporary files left behind
    names = mx.load(str(adapters / "adapters.safetensors")).keys()
    # every linear kind is adapted: attention, dense MLP, router, experts, self-conditioning
    for part in (
        "self_attn.q_proj.lora_a",
        "mlp.down_proj.lora_b",
        "router.proj.lora_a",
        "experts.gate_up_proj.lora_a",
        "self_conditioning.up_proj.lora_a",
    ):
        assert any(part in k for k in names), part

    # the adapter generates, and fused weights give the same logits as model + adapter
    model, tok = load(task_model, adapter_path=adapters)
    from mlx_diffusiongemma import generate

    assert isinstance(generate(model, tok, "1 2 3 4 5 6", seed=0), str)
    fused_path = fuse(task_model, adapters, tmp_path / "fused")
    fused = load_model(fused_path)
    rng = np.random.default_rng(0)
    ids, canvas = rng.integers(0, 22, (2, 9)), rng.integers(0, 22, (2, CANVAS))
    want = model(mx.array(ids), mx.array(canvas))
    got = fused(mx.array(ids), mx.array(canvas))
    assert np.abs(np.array(got) - np.array(want)).max() < 1e-5
    base = load_model(task_model)(mx.array(ids), mx.array(canvas))
    assert np.abs(np.array(base) - np.array(want)).max() > 1e-3  # the adapter did something
    # the fused folder loads in transformers as it is, with the logits of model + adapter
    ref = reference_logits(fused_path, ids, canvas)
    assert np.abs(ref - np.array(want)).max() < 1e-4


def test_resume_continues_the_same_run(task_model, data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--learning-rate", 2e-3, "--steps-per-eval", 100, "--num-layers", 2)
    run_lora(task_model, data, straight, "--iters", 6, "--save-every", 3, *common)
    run_lora(task_model, data, split, "--iters", 3, "--save-every", 3, *common)
    run_lora(
        task_model,
        data,
        split,
        "--iters",
        6,
        "--save-every",
        3,
        *common,
        "--resume-adapter-file",
        split / "0000003_adapters.safetensors",
    )
    a = mx.load(str(straight / "adapters.safetensors"))
    b = mx.load(str(split / "adapters.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float(mx.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-5, worst


def test_grad_checkpoint_trains_the_same_adapters(task_model, data, tmp_path):
    """--grad-checkpoint recomputes activations (tuner/checkpoint.py): the run's adapters are
    those of the run without it, and the layer class is itself again afterwards."""
    from mlx_diffusiongemma.model import Layer

    forward = Layer.__call__
    common = ("--iters", 3, "--learning-rate", 2e-3, "--steps-per-eval", 100, "--num-layers", 2)
    run_lora(task_model, data, tmp_path / "plain", *common)
    run_lora(task_model, data, tmp_path / "ckpt", *common, "--grad-checkpoint")
    assert Layer.__call__ is forward
    a = mx.load(str(tmp_path / "plain" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "ckpt" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float(mx.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full(task_model, data, tmp_path, kind):
    adapters = tmp_path / kind
    run_lora(
        task_model,
        data,
        adapters,
        "--iters",
        2,
        "--fine-tune-type",
        kind,
        "--num-layers",
        2,
        "--steps-per-eval",
        100,
    )
    weights = mx.load(str(adapters / "adapters.safetensors"))
    if kind == "dora":
        assert any(k.endswith(".m") for k in weights)
        assert not any("experts" in k for k in weights)  # mlx-lm has no DoRA expert layer
    else:
        assert any(k.endswith("experts.gate_up_proj.weight") for k in weights)
    model, tok = load(task_model, adapter_path=adapters)
    model(mx.array([[2, 4, 9]]), mx.array([[9] * CANVAS]))


def test_qlora_on_a_quantized_base(task_model, data, tmp_path):
    from mlx_diffusiongemma.convert import convert

    q = convert(
        task_model, tmp_path / "q", quantize=True, q_bits=4, q_group_size=32, log=lambda *a: None
    )
    adapters = tmp_path / "qlora"
    run_lora(
        q,
        data,
        adapters,
        "--iters",
        2,
        "--num-layers",
        1,
        "--steps-per-eval",
        100,
        "--learning-rate",
        1e-2,
    )
    model, _ = load(q, adapter_path=adapters)
    assert any(hasattr(m, "scales") for _, m in model.named_modules())
    fused = tmp_path / "qfused"
    fuse_cli.main(["--model", str(q), "--adapter-path", str(adapters), "--save-path", str(fused)])
    config = json.loads((fused / "config.json").read_text())
    assert "quantization" in config  # MLX's quantized weights: a folder only MLX reads
    fuse_cli.main(
        [
            "--model",
            str(q),
            "--adapter-path",
            str(adapters),
            "--save-path",
            str(fused),
            "--dequantize",
            "--force",
        ]
    )
    config = json.loads((fused / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    # the 4-bit base + adapter, fused and dequantized, loads in transformers as it is and gives
    # the logits of the quantized model with the adapter
    rng = np.random.default_rng(1)
    ids, canvas = rng.integers(0, 22, (2, 9)), rng.integers(0, 22, (2, CANVAS))
    want = np.array(model(mx.array(ids), mx.array(canvas)))
    base = np.array(load_model(q)(mx.array(ids), mx.array(canvas)))
    assert np.abs(base - want).max() > 1e-3  # the adapter did something
    assert np.abs(np.array(load_model(fused)(mx.array(ids), mx.array(canvas))) - want).max() < 1e-4
    assert np.abs(reference_logits(fused, ids, canvas) - want).max() < 1e-4


def test_data_formats(task_model, tmp_path):
    from mlx_diffusiongemma.tuner.datasets import tokenize

    _, tok = load(task_model)
    for kind in ("chat", "text"):
        write_split(tmp_path, kind, 3, 0, kind)
        examples = tokenize(tmp_path / f"{kind}.jsonl", tok, CANVAS, 4096)
        prompt, response = examples[0]
        if kind == "text":
            assert prompt == [tok.bos_token_id] and len(response) == 24 + 1
        else:
            assert tok.decode(prompt).strip().endswith("model")
            assert response[-1] == EOS[1]  # the end of the assistant turn is supervised


def cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


@pytest.mark.parametrize("case", ["bad_json", "empty", "too_long", "iters0", "mismatch"])
def test_bad_input_is_one_line(task_model, data, tmp_path, case):
    folder = tmp_path / "d"
    folder.mkdir()
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text((data / f"{split}.jsonl").read_text())
    args = [
        "--model",
        str(task_model),
        "--train",
        "--data",
        str(folder),
        "--iters",
        "1",
        "--batch-size",
        "2",
        "--num-layers",
        "2",
        "--adapter-path",
        str(tmp_path / "a"),
    ]
    expect = {
        "bad_json": "train.jsonl:3",
        "empty": "valid.jsonl holds no examples",
        "too_long": "--max-seq-length",
        "iters0": "--iters",
        "mismatch": "does not fit",
    }[case]
    if case == "bad_json":
        lines = (folder / "train.jsonl").read_text().splitlines()
        lines[2] = '{"prompt": "1 2'
        (folder / "train.jsonl").write_text("\n".join(lines))
    elif case == "empty":
        (folder / "valid.jsonl").write_text("")
    elif case == "too_long":
        args += ["--max-seq-length", "20"]
    elif case == "iters0":
        args[args.index("--iters") + 1] = "0"
    else:  # an adapter trained on another model
        r = cli("mlx_diffusiongemma.lora", *args)
        assert r.returncode == 0, r.stderr
        from make_checkpoints import write_checkpoint

        other = tmp_path / "other"
        write_checkpoint(
            other,
            canvas_length=CANVAS,
            vocab_size=len(vocabulary(9)),
            hidden_size=32,
            intermediate_size=48,
            eos_token_id=EOS,
        )
        write_tokenizer(other, 9)
        r = cli(
            "mlx_diffusiongemma.generate",
            "--model",
            str(other),
            "--adapter-path",
            str(tmp_path / "a"),
            "--prompt",
            "hi",
        )
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return
    r = cli("mlx_diffusiongemma.lora", *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert expect in r.stderr, r.stderr
