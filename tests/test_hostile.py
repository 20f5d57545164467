"""Hostile and careless model folders, built from the bundled demo checkpoint: each is refused
when opened, before any weight is read, with one line naming the file and the key or tensor.
A new case is one line in CASES (or ACCEPTED, for what must still load)."""

import json
import math
import os
import re
import shutil
import signal
import struct
from pathlib import Path

import pytest

from mlx_diffusiongemma import convert as conv
from mlx_diffusiongemma import load
from mlx_diffusiongemma.cli import DEMO_MODEL, user_errors


# ---- building blocks: each returns a function that edits a copied folder -------------------------
def edit_json(name, fn):
    def mutate(folder):
        f = folder / name
        f.write_text(json.dumps(fn(json.loads(f.read_text()))))

    return mutate


def replace_json(name, value):
    return edit_json(name, lambda _: value)


def text(key, value):
    return edit_json(
        "config.json", lambda c: {**c, "text_config": {**c["text_config"], key: value}}
    )


def top(key, value):
    return edit_json("config.json", lambda c: {**c, key: value})


def rope(kind, value):
    def fn(c):
        t = c["text_config"]
        return {**c, "text_config": {**t, "rope_parameters": {**t["rope_parameters"], kind: value}}}

    return edit_json("config.json", fn)


def gen(key, value):
    return edit_json("generation_config.json", lambda g: {**g, key: value})


def one_more_token(tok):
    """A tokenizer.json with one added token past its last id (more ids than the model has)."""
    vocab = tok["model"]["vocab"]  # {piece: id}, or [[piece, score], ...] for Unigram
    ids = [t["id"] for t in tok.get("added_tokens", [])]
    ids += list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    tok.setdefault("added_tokens", []).append(
        {
            "id": max(ids) + 1,
            "content": "<|one too many|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    return tok


def write(name, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def remove(*names):
    def mutate(folder):
        for n in names:
            (folder / n).unlink()

    return mutate


def broken_link(name):
    def mutate(folder):
        (folder / name).unlink()
        (folder / name).symlink_to(folder / "nowhere.json")

    return mutate


def fifo(name):
    def mutate(folder):
        (folder / name).unlink()
        os.mkfifo(folder / name)

    return mutate


def directory(name):
    def mutate(folder):
        (folder / name).unlink()
        (folder / name).mkdir()

    return mutate


def read_st(f: Path):
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def header(fn):
    """Edits model.safetensors's header (and, when fn returns bytes, its data section)."""

    def mutate(folder):
        f = folder / "model.safetensors"
        head, data = read_st(f)
        new = fn(head, data)
        data = data if new is None else new
        raw = json.dumps(head).encode()
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)

    return mutate


def tensors(head):
    """Tensor entries by offset: (name, entry)."""
    return sorted(
        ((k, v) for k, v in head.items() if k != "__metadata__"),
        key=lambda kv: kv[1]["data_offsets"][0],
    )


def alias_two(head, data):
    """The second of two same-sized tensors made to point at the first one's bytes."""
    by_size = {}
    for k, v in tensors(head):
        size = v["data_offsets"][1] - v["data_offsets"][0]
        if size in by_size:
            v["data_offsets"] = list(head[by_size[size]]["data_offsets"])
            return
        by_size[size] = k


BYTES = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "F8_E5M2": 1}


def retype(dtype):
    """The first weight whose bytes can be read as `dtype` declared so (its last dimension
    rescaled: the byte size is unchanged, only the type is wrong)."""

    def fn(head, data):
        for k, v in tensors(head):
            nbytes = v["shape"][-1] * BYTES[v["dtype"]]
            if k.endswith(".weight") and nbytes % BYTES[dtype] == 0:
                v["dtype"], v["shape"][-1] = dtype, nbytes // BYTES[dtype]
                return

    return fn


def first(field, value):
    def fn(head, data):
        tensors(head)[0][1][field] = value

    return fn


def shift_all(n):
    """n zero bytes before the first tensor, every offset moved past them."""

    def fn(head, data):
        for _, v in tensors(head):
            v["data_offsets"] = [o + n for o in v["data_offsets"]]
        return b"\0" * n + data

    return fn


def no_tensors(head, data):
    """A valid file with no tensors: the loader then names every missing one."""
    head.clear()
    return b""


def index(value):
    def mutate(folder):
        (folder / "model.safetensors.index.json").write_text(json.dumps(value))

    return mutate


# ---- the table: (case, how the folder is spoiled, what the one line must say) --------------------
CASES = [
    # tokenizer
    ("no tokenizer", remove("tokenizer.json"), r"has no tokenizer \(neither tokenizer\.json"),
    ("tokenizer broken link", broken_link("tokenizer.json"), r"tokenizer\.json is a broken link"),
    ("tokenizer fifo", fifo("tokenizer.json"), r"tokenizer\.json is not a regular file"),
    ("tokenizer garbage", write("tokenizer.json", b'{"model": 42}'), r"tokenizer cannot be loaded"),
    (
        "tokenizer too big",
        edit_json("tokenizer.json", one_more_token),
        r"the tokenizer has \d+ tokens, more than the model's vocabulary of \d+",
    ),
    # safetensors headers
    ("overlapping offsets", header(alias_two), r"model\.safetensors: tensors .* overlap"),
    (
        "I32 float weight",
        header(retype("I32")),
        r"model\.safetensors: tensor \S+ is I32; the model takes F32 or F16 or BF16",
    ),
    ("F64 tensor", header(retype("F64")), r"is F64, which MLX cannot read"),
    ("F8_E5M2 tensor", header(retype("F8_E5M2")), r"is F8_E5M2, which MLX cannot read"),
    ("negative offset", header(first("data_offsets", [-4, 60])), r"bad data_offsets \[-4, 60\]"),
    ("string offset", header(first("data_offsets", ["0", "64"])), r"bad data_offsets"),
    ("float offset", header(first("data_offsets", [0.0, 64.0])), r"bad data_offsets"),
    ("bool in shape", header(first("shape", [True])), r"bad shape"),
    ("string dtype list", header(first("dtype", ["F32"])), r"unsupported dtype"),
    ("metadata list", header(lambda h, d: h.update(__metadata__=[1, 2])), r"__metadata__ must be"),
    (
        "metadata numbers",
        header(lambda h, d: h.update(__metadata__={"a": 1})),
        r"__metadata__ must",
    ),
    ("gap before data", header(shift_all(8)), r"8 unused bytes before tensor"),
    ("bytes after data", header(lambda h, d: d + b"\0" * 8), r"8 bytes after the last tensor"),
    ("no tensors", header(no_tensors), r"missing tensors"),
    (
        "header is a list",
        write("model.safetensors", struct.pack("<Q", 2) + b"[]"),
        r"corrupt safetensors header \(not a JSON object\)",
    ),
    ("weights fifo", fifo("model.safetensors"), r"model\.safetensors: not a regular file"),
    ("weights folder", directory("model.safetensors"), r"model\.safetensors: not a regular file"),
    ("weights broken link", broken_link("model.safetensors"), r"cannot read \(a broken link\)"),
    ("weights empty", write("model.safetensors", b""), r"not a safetensors file \(too short\)"),
    ("index list", index([]), r"index\.json is not a valid index"),
    ("index escapes", index({"weight_map": {"a": "../model.safetensors"}}), r"not a valid index"),
    # config.json
    (
        "config list",
        replace_json("config.json", []),
        r"config\.json must hold a JSON object \(got a list",
    ),
    (
        "config null",
        replace_json("config.json", None),
        r"config\.json must hold a JSON object \(got null",
    ),
    ("config fifo", fifo("config.json"), r"config\.json is not a regular file"),
    ("config garbage", write("config.json", b'{"model_type": '), r"config\.json is not valid JSON"),
    (
        "text_config list",
        top("text_config", [1]),
        r"text_config must be a JSON object \(got a list",
    ),
    (
        "hidden_size string",
        text("hidden_size", "64"),
        r"text_config\.hidden_size must be an integer >= 1 \(got the string '64'\)",
    ),
    ("rms_norm_eps string", text("rms_norm_eps", "1e-6"), r"rms_norm_eps must be a finite number"),
    ("rms_norm_eps NaN", text("rms_norm_eps", math.nan), r"rms_norm_eps must be a finite number"),
    (
        "zero kv heads",
        text("num_key_value_heads", 0),
        r"num_key_value_heads must be an integer >= 1",
    ),
    (
        "zero global kv heads",
        text("per_layer_config", {"5": {"num_key_value_heads": 0}}),
        r"per_layer_config\.5\.num_key_value_heads must be an integer >= 1",
    ),
    ("odd head_dim", text("head_dim", 15), r"head_dim 15 is odd"),
    ("layers string", text("num_hidden_layers", "6"), r"num_hidden_layers must be an integer"),
    ("layer_types string", text("layer_types", "sliding"), r"layer_types must be a list"),
    ("sliding_window 0", text("sliding_window", 0), r"sliding_window must be an integer >= 1"),
    ("softcap string", text("final_logit_softcapping", "30"), r"final_logit_softcapping must be"),
    ("bias string", text("attention_bias", "false"), r"attention_bias must be true or false"),
    ("rope block list", rope("full_attention", []), r"rope_parameters\.full_attention must be"),
    (
        "rope theta string",
        rope("sliding_attention", {"rope_type": "default", "rope_theta": "1e4"}),
        r"sliding_attention\.rope_theta must be a finite number",
    ),
    (
        "rope type unknown",
        rope("sliding_attention", {"rope_type": "yarn", "rope_theta": 1e4}),
        r"rope_type 'yarn' is not supported",
    ),
    (
        "rope factor > 1",
        rope(
            "full_attention",
            {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 2},
        ),
        r"partial_rotary_factor must be a finite number in \(0, 1\] \(got 2\)",
    ),
    ("canvas -4", top("canvas_length", -4), r"canvas_length must be an integer >= 1 \(got -4\)"),
    ("canvas 0", top("canvas_length", 0), r"canvas_length must be an integer >= 1 \(got 0\)"),
    ("canvas string", top("canvas_length", "32"), r"canvas_length must be an integer"),
    (
        "canvas past context",
        edit_json(
            "config.json",
            lambda c: {**c, "canvas_length": c["text_config"]["max_position_embeddings"] + 8},
        ),
        r"exceeds max_position_embeddings",
    ),
    ("tie string", top("tie_word_embeddings", "yes"), r"tie_word_embeddings must be true or false"),
    ("quant bits 0", top("quantization", {"bits": 0, "group_size": 64}), r"quantization bits must"),
    ("quant list", top("quantization", [4]), r"quantization must be a JSON object"),
    ("eos string", text("eos_token_id", "1"), r"eos_token_id must be an integer >= 0"),
    ("other model", top("model_type", "llama"), r"model_type is 'llama'"),
    # generation_config.json
    (
        "gen list",
        replace_json("generation_config.json", []),
        r"generation_config\.json must hold a JSON object \(got a list\)",
    ),
    (
        "gen null",
        replace_json("generation_config.json", None),
        r"must hold a JSON object \(got null",
    ),
    (
        "gen t_min string",
        gen("t_min", "0.4"),
        r"generation_config\.json: t_min must be a finite number >= 0 \(got the string '0\.4'\)",
    ),
    ("gen t_min NaN", gen("t_min", math.nan), r"t_min must be a finite number >= 0 \(got nan\)"),
    ("gen t_max inf", gen("t_max", math.inf), r"t_max must be a finite number"),
    ("gen steps 0", gen("max_denoising_steps", 0), r"max_denoising_steps must be an integer >= 1"),
    ("gen tokens 0", gen("max_new_tokens", 0), r"max_new_tokens must be an integer >= 1"),
    ("gen steps float", gen("max_denoising_steps", 4.5), r"max_denoising_steps must be an integer"),
    (
        "gen bound NaN",
        gen("sampler_config", {"entropy_bound": math.nan}),
        r"sampler_config\.entropy_bound must be a finite number > 0",
    ),
    ("gen sampler list", gen("sampler_config", [0.1]), r"sampler_config must be a JSON object"),
    ("gen t order", gen("t_min", 0.9), r"t_max must be greater than t_min"),
    (
        "gen eos string",
        gen("eos_token_id", ["1"]),
        r"generation_config\.json: eos_token_id must be",
    ),
    ("gen fifo", fifo("generation_config.json"), r"generation_config\.json is not a regular file"),
]
# What must still load: null means unset.
ACCEPTED = [
    ("null rope block", rope("full_attention", None)),
    ("null softcap", text("final_logit_softcapping", None)),
    ("null gen keys", gen("t_min", None)),
    ("null canvas", top("canvas_length", None)),
]


def spoiled(tmp_path, name, mutate):
    folder = tmp_path / re.sub(r"\W+", "-", name)
    shutil.copytree(DEMO_MODEL, folder)
    mutate(folder)
    return folder


@pytest.fixture
def alarm():
    """A FIFO that is opened would block forever: fail instead."""

    def hung(*_):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name, mutate, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_folder_is_refused_with_one_line(name, mutate, message, tmp_path, alarm):
    folder = spoiled(tmp_path, name, mutate)
    with pytest.raises(user_errors()) as e:
        load(folder)
    text = str(e.value)
    assert re.search(message, text), text
    assert "\n" not in text and not isinstance(e.value, TimeoutError)


@pytest.mark.parametrize("name, mutate", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_null_means_unset(name, mutate, tmp_path):
    from mlx_diffusiongemma import generate

    model, tok = load(spoiled(tmp_path, name, mutate))
    assert generate(model, tok, [5, 6, 7], max_tokens=8, max_denoising_steps=2, seed=0) is not None


CONVERTED = [c for c in CASES if not c[0].startswith(("tokenizer", "no tokenizer"))]


@pytest.mark.parametrize("name, mutate, message", CONVERTED, ids=[c[0] for c in CONVERTED])
def test_converter_refuses_the_same(name, mutate, message, tmp_path, capsys, alarm):
    out = tmp_path / "out"
    rc = conv.main(["--hf-path", str(spoiled(tmp_path, name, mutate)), "--mlx-path", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and re.search(message, err), err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_token_ids_need_no_tokenizer(tmp_path):
    """The folder `load` refuses for text still serves token ids through `load_model`."""
    from mlx_diffusiongemma import load_model, stream_generate

    folder = spoiled(tmp_path, "ids only", remove("tokenizer.json"))
    rs = list(
        stream_generate(
            load_model(folder),
            None,
            [5, 6, 7],
            max_tokens=8,
            max_denoising_steps=2,
            seed=0,
            eos_token_ids=[],
        )
    )
    assert rs[-1].tokens and rs[-1].finish_reason == "length"  # a whole canvas of ids
