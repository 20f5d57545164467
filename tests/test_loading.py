"""Checkpoint discovery, sharding, hub ids and the errors bad checkpoints get."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

from mlx_diffusiongemma import load_model
from mlx_diffusiongemma.config import ConfigError
from mlx_diffusiongemma.loader import ModelNotFoundError
from mlx_diffusiongemma.safetensors_check import CheckpointError


@pytest.fixture
def copy_of(tiny, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny[0], dst)
    return dst


def rewrite(path, fn):
    f = path / "model.safetensors"
    save_file(fn(load_file(f)), f, metadata={"format": "pt"})


def test_sharded_checkpoint_loads_the_same(tiny, tmp_path):
    path, ref = tiny
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, b = load_model(path), load_model(tmp_path / "sharded")
    fa, fb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert fa.keys() == fb.keys()
    assert all(np.array_equal(np.array(fa[k]), np.array(fb[k])) for k in fa)


def test_one_copy_of_shared_weights_and_the_vision_tower(tiny):
    model = load_model(tiny[0])
    names = [k for k, _ in tree_flatten(model.parameters())]
    vision = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
    assert any(k.startswith(vision) for k in names) and model.has_vision
    # the encoder's text weights are the decoder's: only its layer scalars are its own
    enc = [k for k in names if k.startswith("model.encoder.") and not k.startswith(vision)]
    assert enc and all(k.endswith("layer_scalar") for k in enc)
    # the encoder's scalars are its own, not the decoder's
    s_enc = [float(l.layer_scalar[0]) for l in model.model.encoder.language_model.layers]
    s_dec = [float(l.layer_scalar[0]) for l in model.layers]
    assert s_enc != s_dec


def test_dtype_casts_weights(tiny):
    model = load_model(tiny[0], dtype=mx.bfloat16)
    assert model.model.decoder.embed_tokens.weight.dtype == mx.bfloat16


def test_hub_id_goes_through_huggingface_hub(tiny, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tiny[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("google/diffusiongemma-26B-A4B-it")
    assert model.args.hidden_size == 64
    repo, patterns = calls[0]
    assert repo == "google/diffusiongemma-26B-A4B-it"
    assert "model*.safetensors" in patterns and "*.bin" not in patterns


def test_unknown_hub_id_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model("./definitely/not/here")


def test_missing_config(copy_of):
    (copy_of / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(copy_of)


def test_other_model_type(copy_of):
    cfg = json.loads((copy_of / "config.json").read_text())
    cfg["model_type"] = "gemma4"
    (copy_of / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type is 'gemma4'"):
        load_model(copy_of)


def test_missing_tensor_is_named(copy_of):
    rewrite(
        copy_of,
        lambda w: {k: v for k, v in w.items() if k != "model.decoder.layers.2.router.proj.weight"},
    )
    with pytest.raises(
        CheckpointError, match=r"missing tensors: model\.decoder\.layers\.2\.router\.proj\.weight"
    ):
        load_model(copy_of)


def test_unexpected_tensor_is_named(copy_of):
    rewrite(
        copy_of, lambda w: {**w, "model.decoder.layers.0.bogus.weight": np.zeros(3, np.float32)}
    )
    with pytest.raises(
        CheckpointError, match=r"unexpected tensors: model\.decoder\.layers\.0\.bogus\.weight"
    ):
        load_model(copy_of)


def test_shape_mismatch_is_named(copy_of):
    def f(w):
        w["model.decoder.layers.1.mlp.up_proj.weight"] = np.zeros((7, 64), np.float32)
        return w

    rewrite(copy_of, f)
    with pytest.raises(CheckpointError, match=r"mlp\.up_proj\.weight has shape \(7, 64\)"):
        load_model(copy_of)


def test_truncated_file(copy_of):
    f = copy_of / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated file"):
        load_model(copy_of)


def test_corrupt_header(copy_of):
    f = copy_of / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json {{{"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_model(copy_of)


def test_missing_shard(tiny, tmp_path):
    tiny[1].save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shard.name}"):
        load_model(tmp_path / "sharded")


def test_pickle_only_checkpoint_is_refused(copy_of):
    (copy_of / "model.safetensors").rename(copy_of / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_model(copy_of)


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("preprocessor_config.json", {"image_processor": {"max_soft_tokens": 140}}),
        ("processor_config.json", {"max_soft_tokens": 560}),
    ],
)
def test_processor_config_gives_the_soft_token_budget(copy_of, name, cfg):
    path = copy_of
    (path / name).write_text(json.dumps(cfg))
    model = load_model(path)
    want = cfg.get("max_soft_tokens") or cfg["image_processor"]["max_soft_tokens"]
    assert model.processor_config == {"max_soft_tokens": want}


@pytest.mark.parametrize(
    "text,msg",
    [
        ("{not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"max_soft_tokens": "many"}', "positive integer"),
    ],
)
def test_bad_processor_config_is_a_clear_error(copy_of, text, msg):
    path = copy_of
    (path / "preprocessor_config.json").write_text(text)
    with pytest.raises(ConfigError, match=msg):
        load_model(path)
