"""convert.py: Hugging Face -> MLX (plain and quantized), the mlx-community layout, safe output,
sharding and command-line errors. Tiny float32 reference checkpoints from transformers."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from make_checkpoints import write_checkpoint  # noqa: E402

from mlx_diffusiongemma import convert as conv  # noqa: E402
from mlx_diffusiongemma import quant  # noqa: E402
from mlx_diffusiongemma.loader import load_model  # noqa: E402
from mlx_diffusiongemma.safetensors_check import read_header  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
IDS = mx.array([[2, 5, 7, 9, 11, 13, 200, 300, 17, 19, 23, 29]])
CANVAS = mx.array([[4, 8, 15, 16, 23, 42, 1, 3, 5, 7, 100, 200, 300, 6, 9, 12]])
# Group sizes up to 64 divide every input dim; two layers (sliding + full) and top_k equal to
# num_experts, so that routing flips (discrete, chaotic in a random tiny model) do not hide
# the quantization error being measured.
QUANT_TEXT = dict(
    hidden_size=128,
    intermediate_size=128,
    moe_intermediate_size=64,
    head_dim=32,
    global_head_dim=64,
    num_hidden_layers=2,
    top_k_experts=8,
    layer_types=["sliding_attention", "full_attention"],
)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    """The default tiny checkpoint (hidden 64: the 32-wide expert down_proj does not fit group
    64), with tokenizer files and a chat template next to it."""
    path = tmp_path_factory.mktemp("conv_tiny")
    write_checkpoint(path)
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "tokenizer_config.json").write_text('{"tokenizer_class": "GemmaTokenizer"}')
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return path


@pytest.fixture(scope="module")
def quant_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv_quant")
    write_checkpoint(path, **QUANT_TEXT)
    return path


@pytest.fixture(scope="module")
def ref_logits(tiny_src, quant_src):
    return {p: logits(p) for p in (tiny_src, quant_src)}


def logits(path_or_model, **kw):
    model = load_model(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    return model(IDS, CANVAS, **kw)


def rel_rms(a, b):
    """RMS of the difference over the RMS spread of the reference logits."""
    return math.sqrt(mx.mean((a - b) ** 2).item() / mx.var(b).item())


def cli(argv, capsys):
    rc = conv.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def tensors(path):
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(read_header(f))
    return out


def leftovers(out: Path):
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


# ---- plain conversion --------------------------------------------------------------------------
def test_unquantized_conversion_is_exact(tiny_src, ref_logits, tmp_path, capsys):
    out = tmp_path / "plain"
    assert cli(["--hf-path", tiny_src, "--mlx-path", out], capsys)[0] == 0
    assert mx.array_equal(logits(out), ref_logits[tiny_src])
    model_a, model_b = load_model(tiny_src), load_model(out)
    sc = mx.random.normal((1, CANVAS.shape[1], 384), key=mx.random.key(0))
    assert mx.array_equal(
        model_a(IDS, CANVAS, sc), model_b(IDS, CANVAS, sc)
    )  # self-conditioning MLP

    src, got = read_header(tiny_src / "model.safetensors"), tensors(out)
    renamed = {
        k + ".weight" if k.endswith((".experts.gate_up_proj", ".experts.down_proj")) else k: v
        for k, v in src.items()
    }
    assert got == renamed  # every tensor, vision tower included, same dtype and shape
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got) and set(index["weight_map"].values()) == {
        "model.safetensors"
    }
    assert index["metadata"]["total_size"] == sum(
        math.prod(s) * 4 for _, s in got.values()
    )  # all F32
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["model_type"] == "diffusion_gemma"
    assert config["text_config"]["global_head_dim"] == 32  # for mlx-vlm, from per_layer_config
    for name in (
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert (out / name).read_bytes() == (tiny_src / name).read_bytes()
    assert "library_name: mlx" in (out / "README.md").read_text()
    from safetensors import safe_open  # the reference reader accepts the streamed files

    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "mlx"} and len(f.keys()) == len(got)
    assert leftovers(out) == []


def test_shared_weights_stored_once(tiny_src, ref_logits, tmp_path, capsys):
    """Tied copies (the encoder's text weights, lm_head) in a source are dropped: the output
    holds the decoder's weights once, plus the encoder's own layer scalars."""
    src = tmp_path / "dup"
    src.mkdir()
    for f in tiny_src.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    w = mx.load(str(src / "model.safetensors"))
    extra = {
        k.replace("model.decoder.", "model.encoder.language_model."): v
        for k, v in w.items()
        if k.startswith("model.decoder.layers.")
    }
    extra["lm_head.weight"] = w["model.decoder.embed_tokens.weight"]
    mx.save_safetensors(str(src / "model.safetensors"), {**extra, **w})

    out = tmp_path / "once"
    assert cli(["--hf-path", src, "--mlx-path", out], capsys)[0] == 0
    got = tensors(out)
    text = {
        k: v
        for k, v in read_header(tiny_src / "model.safetensors").items()
        if not k.startswith(VISION)
    }
    nbytes = lambda hdr: sum(math.prod(s) * 4 for _, s in hdr.values())  # noqa: E731 (all F32)
    assert nbytes({k: v for k, v in got.items() if not k.startswith(VISION)}) == nbytes(text)
    enc = [k for k in got if k.startswith("model.encoder.language_model.")]
    assert enc and all(k.endswith(".layer_scalar") for k in enc) and "lm_head.weight" not in got
    assert mx.array_equal(logits(out), ref_logits[tiny_src])


def test_dtype_and_text_only(tiny_src, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert (
        cli(
            ["--hf-path", tiny_src, "--mlx-path", out, "--dtype", "bfloat16", "--text-only"], capsys
        )[0]
        == 0
    )
    got = tensors(out)
    assert not [k for k in got if k.startswith(VISION)]
    assert {d for d, _ in got.values()} == {"BF16"}
    config = json.loads((out / "config.json").read_text())
    assert "vision_config" not in config and config["dtype"] == "bfloat16"
    assert mx.array_equal(logits(out), logits(load_model(tiny_src, dtype=mx.bfloat16)))


# ---- quantization ------------------------------------------------------------------------------
MODES = {  # name: (cli flags, (bits, group, mode), recipe, bound on the logits' and an expert weight's relative RMS error)
    "affine4": (
        ["--q-bits", "4", "--quant-recipe", "uniform"],
        (4, 64, "affine"),
        "uniform",
        (0.9, 0.12),
    ),
    "affine8": (
        ["--q-bits", "8", "--quant-recipe", "uniform"],
        (8, 64, "affine"),
        "uniform",
        (0.12, 0.008),
    ),
    "mxfp4": (
        ["--q-mode", "mxfp4", "--quant-recipe", "uniform"],
        (4, 32, "mxfp4"),
        "uniform",
        (0.9, 0.15),
    ),
    "mxfp8": (
        ["--q-mode", "mxfp8", "--quant-recipe", "uniform"],
        (8, 32, "mxfp8"),
        "uniform",
        (0.4, 0.035),
    ),
    "nvfp4": (
        ["--q-mode", "nvfp4", "--quant-recipe", "uniform"],
        (4, 16, "nvfp4"),
        "uniform",
        (0.95, 0.13),
    ),
    "mixed4": ([], (4, 64, "affine"), "mixed", (0.3, 0.12)),
    "mixed_mxfp4": (["--q-mode", "mxfp4"], (4, 32, "mxfp4"), "mixed", (0.35, 0.15)),
}
ERRORS = {}


@pytest.mark.parametrize("name", list(MODES))
def test_quantized_modes(name, quant_src, ref_logits, tmp_path, capsys):
    flags, (bits, gs, mode), recipe, bound = MODES[name]
    out = tmp_path / name
    assert cli(["--hf-path", quant_src, "--mlx-path", out, "-q", *flags], capsys)[0] == 0
    model = load_model(out)
    got = logits(model)

    # Exactly what quantizing the reference model in memory with the same recipe gives.
    default = {"group_size": gs, "bits": bits, "mode": mode}
    mem = load_model(quant_src)
    nn.quantize(mem, **default, class_predicate=quant.predicate(default, recipe))
    assert mx.array_equal(got, logits(mem))

    # The random tiny model amplifies weight error ~15x (a bf16 cast alone gives 0.06), so the
    # logit bounds are loose; the weight bounds check the quantization itself.
    layer = model.model.decoder.layers[1]
    ql = layer.experts.gate_up_proj
    deq = mx.dequantize(ql.weight, ql.scales, getattr(ql, "biases", None), gs, bits, mode=mode)
    want = mx.load(str(quant_src / "model.safetensors"))[
        "model.decoder.layers.1.experts.gate_up_proj"
    ]
    w_err = math.sqrt(
        mx.mean((deq.astype(mx.float32) - want) ** 2).item() / mx.mean(want**2).item()
    )
    err = rel_rms(got, ref_logits[quant_src])
    ERRORS[name] = (err, w_err)
    assert err < bound[0] and w_err < bound[1], (
        f"{name}: relative RMS error logits {err:.3f}, weight {w_err:.4f}"
    )

    block = json.loads((out / "config.json").read_text())["quantization"]
    assert {k: block[k] for k in ("group_size", "bits", "mode")} == default
    assert json.loads((out / "config.json").read_text())["quantization_config"] == block
    assert (layer.experts.gate_up_proj.bits, layer.experts.gate_up_proj.mode) == (bits, mode)
    assert model.model.decoder.self_conditioning.gate_proj.bits == bits
    hp = (8, "affine") if recipe == "mixed" else (bits, mode)
    for m in (
        model.model.decoder.embed_tokens,
        layer.self_attn.q_proj,
        layer.mlp.down_proj,
        layer.router.proj,
    ):
        assert (m.bits, m.mode) == hp
    overrides = {k for k in block if "." in k}
    if recipe == "mixed" and default != quant.HIGH_PRECISION:
        assert (
            "model.decoder.embed_tokens" in overrides
            and "model.decoder.layers.1.router.proj" in overrides
        )
        assert all(quant.is_high_precision(k) for k in overrides)
    else:
        assert not overrides
    assert layer.input_layernorm.weight.dtype == mx.float32  # norms untouched
    biases = [k for k in tensors(out) if k.endswith(".biases")]
    assert bool(biases) == (mode == "affine" or recipe == "mixed")


def test_report_quantization_errors():
    """Prints the measured errors (run with -s); the bounds are checked per mode above."""
    if ERRORS:
        print(
            "\nrelative RMS error (logits, expert weight): "
            + ", ".join(f"{k} {a:.3f} {b:.4f}" for k, (a, b) in ERRORS.items())
        )


def test_group_size_misfit_stays_unquantized(tiny_src, ref_logits, tmp_path, capsys):
    """hidden 64 / expert width 32 with group 64: the expert down_proj stays float (as mlx-lm
    does) and the result still loads; 8-bit keeps the logits close."""
    out = tmp_path / "misfit"
    assert cli(["--hf-path", tiny_src, "--mlx-path", out, "-q", "--q-bits", "8"], capsys)[0] == 0
    got = tensors(out)
    assert "model.decoder.layers.0.experts.down_proj.scales" not in got
    assert "model.decoder.layers.0.experts.gate_up_proj.scales" in got
    model = load_model(out)
    assert not hasattr(model.model.decoder.layers[0].experts.down_proj, "bits")
    assert mx.all(mx.isfinite(logits(model))).item()


def test_self_conditioning_with_mx_mode_embeddings(quant_src, ref_logits, tmp_path, capsys):
    out = tmp_path / "mxemb"
    assert (
        cli(
            [
                "--hf-path",
                quant_src,
                "--mlx-path",
                out,
                "-q",
                "--q-mode",
                "mxfp4",
                "--quant-recipe",
                "uniform",
            ],
            capsys,
        )[0]
        == 0
    )
    model, ref = load_model(out), load_model(quant_src)
    soft, want = (
        model.soft_embeddings(ref_logits[quant_src]),
        ref.soft_embeddings(ref_logits[quant_src]),
    )
    assert rel_rms(soft.astype(mx.float32), want) < 0.3


# ---- mlx-community (mlx-vlm 0.7.10) layout -----------------------------------------------------
def write_mlx_community(src: Path, out: Path, n_shards=2):
    """What `mlx_vlm.convert -q` (0.7.10) writes for DiffusionGemma: Hugging Face key names,
    experts as `.weight/.scales/.biases`, the model's quant_predicate (8-bit embeddings,
    attention, dense MLP, router; 4-bit otherwise) recorded as per-module overrides without a
    mode, the vision tower unquantized, torch_dtype dropped, shards + index."""
    out.mkdir()
    weights, block = {}, {"group_size": 64, "bits": 4, "mode": "affine"}
    for key, v in mx.load(str(src / "model.safetensors")).items():
        if key.startswith("model.encoder.language_model.") and not key.endswith("layer_scalar"):
            continue
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            key += ".weight"
        path = key[: -len(".weight")]
        if key.startswith(VISION) or not key.endswith(".weight") or v.ndim < 2:
            weights[key] = v
            continue
        eight = (
            path.endswith(("embed_tokens", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
            or ".self_attn." in path
            or "router" in path
        )
        if eight:
            block[path] = {"group_size": 64, "bits": 8}
        weights[f"{path}.weight"], weights[f"{path}.scales"], weights[f"{path}.biases"] = (
            mx.quantize(v, 64, 8 if eight else 4)
        )
    config = json.loads((src / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["quantization"] = config["quantization_config"] = block
    (out / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    keys = list(weights)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: weights[k] for k in keys[i::n_shards]}
        mx.save_safetensors(str(out / name), part, metadata={"format": "mlx"})
        weight_map.update({k: name for k in part})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": weight_map,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def test_mlx_community_layout_loads_and_matches(quant_src, ref_logits, tmp_path, capsys):
    community = tmp_path / "community-4bit"
    write_mlx_community(quant_src, community)
    ours = tmp_path / "ours-4bit"
    assert cli(["--hf-path", quant_src, "--mlx-path", ours, "-q"], capsys)[0] == 0
    assert tensors(community) == tensors(ours)  # same names, dtypes and shapes

    model = load_model(community)
    layer = model.model.decoder.layers[0]
    assert (
        layer.experts.gate_up_proj.bits,
        layer.self_attn.q_proj.bits,
        model.model.decoder.embed_tokens.bits,
    ) == (4, 8, 8)
    got = logits(model)
    assert mx.array_equal(got, logits(ours))
    assert rel_rms(got, ref_logits[quant_src]) < MODES["mixed4"][3][0]
    # and it is no conversion source
    rc, err = cli(["--hf-path", community, "--mlx-path", tmp_path / "again", "-q"], capsys)
    assert rc == 1 and "already quantized" in err


# ---- output folder -----------------------------------------------------------------------------
def test_sharding(quant_src, ref_logits, tmp_path, capsys):
    out = tmp_path / "sharded"
    limit = 200_000
    assert (
        cli(["--hf-path", quant_src, "--mlx-path", out, "--max-shard-size", "200000"], capsys)[0]
        == 0
    )
    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and [p.name for p in shards] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    for p in shards:
        hdr = read_header(p)
        if len(hdr) > 1:  # a single bigger tensor gets a shard of its own
            assert sum(math.prod(s) * 4 for _, s in hdr.values()) <= limit
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert {index["weight_map"][k] for k in tensors(out)} == {p.name for p in shards}
    assert mx.array_equal(logits(out), ref_logits[quant_src])
    assert conv.parse_size("5GB") == 5 << 30 and conv.parse_size("1.5k") == 1536


def test_existing_output_and_force(tiny_src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "stale.txt").write_text("old")
    rc, err = cli(["--hf-path", tiny_src, "--mlx-path", out], capsys)
    assert rc == 1 and "--force" in err and (out / "stale.txt").exists()
    assert cli(["--hf-path", tiny_src, "--mlx-path", out, "--force"], capsys)[0] == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(out) == []

    other = tmp_path / "notamodel"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    rc, err = cli(["--hf-path", tiny_src, "--mlx-path", other, "--force"], capsys)
    assert rc == 1 and "no config.json" in err and (other / "notes.txt").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["--hf-path", tiny_src, "--mlx-path", empty], capsys)[0] == 0

    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, err = cli(["--hf-path", tiny_src, "--mlx-path", afile, "--force"], capsys)
    assert rc == 1 and "not a folder" in err

    rc, err = cli(["--hf-path", tiny_src, "--mlx-path", tiny_src, "--force"], capsys)
    assert rc == 1 and "replace the source" in err and (tiny_src / "model.safetensors").exists()


@pytest.mark.parametrize(
    "exc, rc, message",
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        ("SIGTERM", 130, "interrupted"),
        (OSError(28, "No space left on device"), 1, "No space left on device"),
    ],
)
def test_interrupted_run_leaves_nothing(tiny_src, tmp_path, capsys, monkeypatch, exc, rc, message):
    out = tmp_path / "out"
    stale = tmp_path / ".out.partial-999999999"  # a killed earlier run: removed, never renamed
    stale.mkdir()
    real, calls = conv.write_safetensors, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            if exc == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)
            raise exc
        return real(*args, **kw)

    monkeypatch.setattr(conv, "write_safetensors", failing)
    got_rc, err = cli(
        ["--hf-path", tiny_src, "--mlx-path", out, "--max-shard-size", "100KB"], capsys
    )
    assert got_rc == rc and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and leftovers(out) == []


# ---- bad input ---------------------------------------------------------------------------------
def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def bad_sources(tiny_src, tmp: Path):
    cases = {}
    d = _copy(tiny_src, tmp / "llama")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    cases["llama"] = (d, "model_type is 'llama'")
    d = tmp / "noconfig"
    d.mkdir()
    cases["noconfig"] = (d, "no config.json")
    cases["nowhere"] = (tmp / "does-not-exist", "does not exist")
    d = _copy(tiny_src, tmp / "missing")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    keys = read_header(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)
                }
            }
        )
    )
    cases["missing"] = (d, "missing shard(s)")
    d = _copy(tiny_src, tmp / "corrupt")
    (d / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}" + b"\0" * 64
    )
    cases["corrupt"] = (d, "corrupt safetensors header")
    d = _copy(tiny_src, tmp / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (d, "truncated file")
    d = _copy(tiny_src, tmp / "shape")
    w = mx.load(str(d / "model.safetensors"))
    w["model.decoder.norm.weight"] = mx.ones((65,))
    mx.save_safetensors(str(d / "model.safetensors"), w)
    cases["shape"] = (d, "model.decoder.norm.weight has shape (65,)")
    return cases


def test_bad_sources(tiny_src, tmp_path, capsys):
    for name, (src, message) in bad_sources(tiny_src, tmp_path).items():
        out = tmp_path / f"out-{name}"
        rc, err = cli(["--hf-path", src, "--mlx-path", out, "-q"], capsys)
        assert rc == 1 and message in err, (name, err)
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists() and leftovers(out) == [], name


def test_what_cannot_be_copied_is_an_error(tiny_src, tmp_path, capsys):
    """A tokenizer file the converter cannot copy would be left out silently, giving a folder
    that loads without its tokenizer: refused before any work instead."""
    for name, spoil, message in [
        (
            "tokenizer.json",
            lambda f: f.symlink_to(tmp_path / "gone.json"),
            "cannot copy tokenizer.json: it is a broken link",
        ),
        ("chat_template.jinja", os.mkfifo, "cannot copy chat_template.jinja: not a regular file"),
    ]:
        src = _copy(tiny_src, tmp_path / f"src-{name}")
        (src / name).unlink()
        spoil(src / name)
        out = tmp_path / f"out-{name}"
        rc, err = cli(["--hf-path", src, "--mlx-path", out], capsys)
        assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-q", "--q-bits", "7"], "not supported by MLX"),
        (["-q", "--q-group-size", "48"], "group size 48"),
        (
            ["-q", "--q-mode", "mxfp4", "--q-group-size", "64"],
            "mxfp4 quantization requires group size 32",
        ),
        (["-q", "--q-mode", "nvfp4", "--q-bits", "8"], "nvfp4"),
        (["-q", "--q-mode", "mxfp8", "--q-bits", "4"], "mxfp8"),
        (["-q", "--q-bits", "0"], "quantization bits must be an integer in [1, 64] (got 0)"),
        (
            ["-q", "--q-group-size", "0"],
            "quantization group size must be an integer in [1, 65536] (got 0)",
        ),
    ],
)
def test_unsupported_quantization(tiny_src, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    rc, err = cli(["--hf-path", tiny_src, "--mlx-path", out, *flags], capsys)
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and leftovers(out) == []


def test_usage_errors(tiny_src, tmp_path, capsys):
    for argv, message in [
        (
            ["--hf-path", tiny_src, "--mlx-path", tmp_path / "o", "--q-bits", "8"],
            "need -q/--quantize",
        ),
        (["--hf-path", tiny_src, "--quant-recipe", "uniform"], "--quant-recipe need -q/--quantize"),
        (["--hf-path", tiny_src, "--q-mode", "int4"], "invalid choice"),
        (["--hf-path", tiny_src, "--max-shard-size", "lots"], "invalid size"),
        (["--mlx-path", tmp_path / "o"], "required"),
    ]:
        with pytest.raises(SystemExit) as e:
            conv.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


# ---- entry points ------------------------------------------------------------------------------
def test_entry_points(tiny_src, ref_logits, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "script"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "convert.py"),
            "--hf-path",
            str(tiny_src),
            "--mlx-path",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert mx.array_equal(logits(out), ref_logits[tiny_src])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_diffusiongemma.convert",
            "--hf-path",
            "nobody/no-such-model",
            "--mlx-path",
            str(tmp_path / "hub"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert (
        r.returncode == 1
        and "Traceback" not in r.stderr
        and len(r.stderr.strip().splitlines()) == 1
    )
    assert r.stderr.startswith("error: model 'nobody/no-such-model'")
