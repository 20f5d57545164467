"""Finding, checking and loading DiffusionGemma checkpoints (Hugging Face or MLX layout)."""

import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ConfigError, ModelArgs
from .cpu_memory import keep_freed_memory
from .model import Model
from .safetensors_check import CheckpointError, read_header

WEIGHT_PATTERNS = ["config.json", "generation_config.json", "model*.safetensors", "*.safetensors.index.json"]
TOKENIZER_PATTERNS = ["tokenizer*", "chat_template*", "special_tokens_map.json", "*.model",
                      "processor_config.json", "preprocessor_config.json"]
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
# The tower's linears sit under a `.linear.` infix (transformers' clippable linear).
CLIPPABLE = (".q_proj", ".k_proj", ".v_proj", ".o_proj", ".gate_proj", ".up_proj", ".down_proj")


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_path(path_or_hub_id: Union[str, Path], tokenizer: bool = False) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloading only what is needed."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is not a folder")
        return path
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path {name!r} does not exist")
    from huggingface_hub import snapshot_download

    patterns = WEIGHT_PATTERNS + (TOKENIZER_PATTERNS if tokenizer else [])
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # hub errors come in many classes; all mean "not available"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"model {name!r} is not a local folder and could not be fetched from the Hugging Face hub ({reason})"
        ) from None


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ConfigError(f"{path} has no config.json: not a model folder")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_file} is not valid JSON ({e})") from None


def weight_files(path: Path) -> list:
    """The safetensors files of a checkpoint; with an index, every shard it names must exist."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index.name} is not a valid index ({e})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise CheckpointError(f"missing shard(s) named in {index.name}: {', '.join(missing)}")
        return [path / n for n in names]
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise CheckpointError(f"{path} holds only pickle weights; only safetensors are loaded")
        raise CheckpointError(f"{path} has no model*.safetensors files")
    return files


def sanitize(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """Maps checkpoint keys onto this model's parameter names. The encoder's text weights are
    the decoder's (tied): only its own layer_scalars are taken from the encoder tree."""
    out = {}
    for key, value in weights.items():
        if "rotary_emb" in key:
            continue
        if key.startswith(VISION_PREFIXES):
            if args.vision is not None:
                out[_vision_key(key)] = value
            continue
        if key.startswith("model.encoder.language_model."):
            if key.endswith(".layer_scalar"):
                out[key] = value
            continue
        if key == "lm_head.weight" and args.tie_word_embeddings:
            continue
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            key += ".weight"
        out[key] = value
    return out


def _vision_key(key: str) -> str:
    """The tower's linears as `<proj>.linear.weight`, also from a layout without the infix."""
    path, name = key.rsplit(".", 1)
    if name == "weight" and key.startswith(VISION_PREFIXES[0]) and path.endswith(CLIPPABLE):
        return f"{path}.linear.{name}"
    return key


def has_vision_weights(keys) -> bool:
    return any(k.startswith(VISION_PREFIXES) for k in keys)


def _quantize(model: Model, args: ModelArgs, keys):
    q = args.quantization

    def predicate(path, module):
        if path in q:
            return q[path]
        if not hasattr(module, "to_quantized"):
            return False
        return f"{path}.scales" in keys

    nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                class_predicate=predicate)


def check_weights(model: Model, weights: Dict[str, mx.array]):
    expected = dict(tree_flatten(model.parameters()))
    # transformers fills absent layer_scalar buffers with 1.0; so does the model's init.
    missing = [k for k in expected if k not in weights and not k.endswith(".layer_scalar")]
    unexpected = [k for k in weights if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    for k, v in weights.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            problems.append(f"{k} has shape {tuple(v.shape)}, config implies {tuple(expected[k].shape)}")
            break
    if problems:
        raise CheckpointError("; ".join(problems))


def _names(keys, n=6):
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights_lazily(path: Path, vision: bool = True) -> Dict[str, mx.array]:
    """Every tensor of the checkpoint (without the vision tower's unless `vision`) as a lazy MLX
    array (nothing is read until evaluated), after checking each file's header; tensors named
    in two shards are an error."""
    weights = {}
    for f in weight_files(path):
        header = read_header(f)
        wanted = [k for k in header if vision or not k.startswith(VISION_PREFIXES)]
        if not wanted:
            continue
        arrays = mx.load(str(f))
        for k in wanted:
            if k in weights:
                raise CheckpointError(f"tensor {k} appears in more than one shard")
            weights[k] = arrays[k]
    return weights


def load_model(path_or_hub_id, dtype: Optional[mx.Dtype] = None, lazy: bool = False) -> Model:
    """Loads a DiffusionGemma checkpoint (local folder or hub id) into an MLX `Model`.

    `dtype` casts floating-point weights (e.g. `mx.float32` for CPU work); quantized weights keep
    their packing. The shared encoder/decoder weights exist once in memory."""
    path = resolve_path(path_or_hub_id)
    config = read_config(path)
    args = ModelArgs.from_config(config)
    keep_freed_memory()
    weights = load_weights_lazily(path, vision=args.vision is not None)
    if args.vision is not None and not has_vision_weights(weights):
        args.vision = None  # the config names a tower its weights leave out: load text-only
    weights = sanitize(weights, args)
    model = Model(args)
    if args.quantization:
        _quantize(model, args, weights.keys())
    check_weights(model, weights)
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    model.path = path
    model.generation_config = load_generation_config(path)
    model.processor_config = load_processor_config(path)
    return model


def load_processor_config(path: Path) -> dict:
    """The image processor's soft-token budget, from preprocessor_config.json or the
    processor_config.json Gemma 4 checkpoints carry; {} when neither names one."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = Path(path) / name
        if not f.exists():
            continue
        try:
            cfg = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f} is not valid JSON ({e})") from None
        nested = cfg.get("image_processor") if isinstance(cfg.get("image_processor"), dict) else {}
        n = (cfg.get("max_soft_tokens") or nested.get("max_soft_tokens")
             or cfg.get("image_seq_length"))
        if n:
            return {"max_soft_tokens": int(n)}
    return {}


def load_generation_config(path: Path) -> dict:
    """generation_config.json with `null` fields dropped (null means unset)."""
    f = Path(path) / "generation_config.json"
    if not f.exists():
        return {}
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON ({e})") from None
    return {k: v for k, v in cfg.items() if v is not None}


def load(path_or_hub_id, dtype: Optional[mx.Dtype] = None,
         adapter_path: Optional[Union[str, Path]] = None) -> Tuple[Model, "TokenizerWrapper"]:
    """(model, tokenizer) like `mlx_lm.load`: the tokenizer is mlx-lm's TokenizerWrapper with
    every EOS id from generation_config.json; `adapter_path` adds fine-tuned adapters (a folder
    written by `mlx_diffusiongemma.lora`)."""
    path = resolve_path(path_or_hub_id, tokenizer=True)
    model = load_model(path, dtype=dtype)
    if adapter_path is not None:
        from .tuner.adapters import load_adapters

        load_adapters(model, adapter_path)
        model.eval()
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    eos = model.generation_config.get("eos_token_id", model.args.eos_token_id)
    if isinstance(eos, int):
        eos = [eos]
    tokenizer = load_tokenizer(path, eos_token_ids=eos)
    return model, tokenizer
