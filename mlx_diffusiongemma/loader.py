"""Finding, checking and loading DiffusionGemma checkpoints (Hugging Face or MLX layout)."""

from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import backends
from .checks import check_token_ids, describe, read_json
from .config import ConfigError, ModelArgs
from .distributed import layer_of, stage_layers
from .model import VISION_PREFIXES, Model
from .safetensors_check import CheckpointError, check_dtype, read_header
from .sampler import SamplerSettings

META_PATTERNS = ["config.json", "generation_config.json", "*.safetensors.index.json"]
WEIGHT_PATTERNS = META_PATTERNS + ["model*.safetensors"]
TOKENIZER_PATTERNS = [
    "tokenizer*",
    "chat_template*",
    "special_tokens_map.json",
    "*.model",
    "processor_config.json",
    "preprocessor_config.json",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_path(path_or_hub_id: Union[str, Path], tokenizer: bool = False, weights=None) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloading only what is needed:
    the config, and the weight files named in `weights` (default: all of them)."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is not a folder")
        return path
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path {name!r} does not exist")
    patterns = WEIGHT_PATTERNS if weights is None else META_PATTERNS + list(weights)
    return hub_download(name, patterns + (TOKENIZER_PATTERNS if tokenizer else []))


def hub_download(repo_id: str, patterns: list, revision=None) -> Path:
    """The files of a hub repo that match `patterns`, through huggingface_hub's cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # hub errors come in many classes; all mean "not available"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face hub ({reason})"
        ) from None


def read_config(path: Path) -> dict:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists() and not cfg_file.is_symlink():
        raise ConfigError(f"{path} has no config.json: not a model folder")
    config = read_json(cfg_file, ConfigError)
    if not isinstance(config, dict):
        raise ConfigError(f"{cfg_file} must hold a JSON object (got {describe(config)})")
    return config


def weight_file_names(path: Path, layers=None) -> list:
    """The names of a checkpoint's safetensors files, from its index when it has one (they need
    not be there yet); with `layers` (a pipeline stage's), only the files holding those layers
    or tensors of no layer (a checkpoint without an index: its files, all of them)."""
    index = path / "model.safetensors.index.json"
    if not (index.exists() or index.is_symlink()):
        return [f.name for f in sorted(path.glob("model*.safetensors"))]
    weight_map = read_json(index, CheckpointError)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and _plain_name(v) for v in weight_map.values()
    ):
        raise CheckpointError(
            f"{index.name} is not a valid index (expected a weight_map from tensor names to "
            "file names in the same folder)"
        )
    return sorted(
        {f for k, f in weight_map.items() if layers is None or layer_of(k) in (None, *layers)}
    )


def weight_files(path: Path, layers=None) -> list:
    """The safetensors files of a checkpoint (of `layers` only: see `weight_file_names`); with
    an index, every shard it names must exist."""
    index = path / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        names = weight_file_names(path, layers)
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


def _plain_name(name: str) -> bool:
    """A file name inside the folder: no separators, no `..`, not hidden."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


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

    nn.quantize(
        model,
        group_size=q["group_size"],
        bits=q["bits"],
        mode=q.get("mode", "affine"),
        class_predicate=predicate,
    )


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
            problems.append(
                f"{k} has shape {tuple(v.shape)}, config implies {tuple(expected[k].shape)}"
            )
            break
    if problems:
        raise CheckpointError("; ".join(problems))


def _names(keys, n=6):
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_headers(path: Path, layers=None) -> Dict[Path, dict]:
    """The checked header of every weight file (of `layers`: see `weight_file_names`),
    {file: {tensor: (dtype, shape)}}, before any tensor is read: tensors named in two shards are
    an error, and each text tensor must have a dtype the model takes (see `check_dtype`)."""
    headers = {f: read_header(f) for f in weight_files(path, layers)}
    where = {}
    for f, header in headers.items():
        for k in header:
            if k in where:
                raise CheckpointError(f"tensor {k} appears in both {where[k]} and {f.name}")
            where[k] = f.name
    for f, header in headers.items():
        for k, (dtype, _) in header.items():
            if k.startswith(VISION_PREFIXES) or "rotary_emb" in k:
                continue
            module = k[: -len(".weight")] if k.endswith(".weight") else k
            check_dtype(k, dtype, f"{module}.scales" in where, f.name)
    return headers


def load_weights_lazily(path: Path, vision: bool = True, layers=None) -> Dict[str, mx.array]:
    """Every tensor of the checkpoint (without the vision tower's unless `vision`; of the text
    layers, those in `layers` only, when given) as a lazy MLX array (nothing is read until
    evaluated), after checking every file's header (`read_headers`)."""
    weights = {}
    for f, header in read_headers(path, layers).items():
        wanted = [
            k
            for k in header
            if (vision or not k.startswith(VISION_PREFIXES))
            and (layers is None or layer_of(k) in (None, *layers))
        ]
        if not wanted:
            continue
        try:
            arrays = mx.load(str(f))
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f.name}: cannot be read ({e})") from None
        weights.update((k, arrays[k]) for k in wanted)
    return weights


def load_model(
    path_or_hub_id,
    dtype: Optional[mx.Dtype] = None,
    lazy: bool = False,
    pipeline_group=None,
    pipeline_split=None,
    tensor_group=None,
) -> Model:
    """Loads a DiffusionGemma checkpoint (local folder or hub id) into an MLX `Model`.

    `dtype` casts floating-point weights (e.g. `mx.float32` for CPU work); quantized weights keep
    their packing. The shared encoder/decoder weights exist once in memory. The backend
    (backends/) is selected here, for MLX's default device. With a `pipeline_group` only this
    rank's layers are read (`Model.pipeline`); with a `tensor_group` the model is split
    (`Model.shard`) before its weights are read, one layer at a time."""
    path = resolve_path(path_or_hub_id)
    config = read_config(path)
    args = ModelArgs.from_config(config)
    generation_config = load_generation_config(path)
    backends.select().setup()
    layers = None
    if pipeline_group is not None:
        layers = stage_layers(args.num_hidden_layers, pipeline_group, pipeline_split)
    weights = load_weights_lazily(path, vision=args.vision is not None, layers=layers)
    if args.vision is not None and not has_vision_weights(weights):
        args.vision = None  # the config names a tower its weights leave out: load text-only
    model = Model(args)
    if pipeline_group is not None:
        model.pipeline(pipeline_group, pipeline_split)
    weights = model.sanitize(weights)
    if args.quantization:
        _quantize(model, args, weights.keys())
    check_weights(model, weights)
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=False)
    del weights  # a split tensor's whole array must not outlive its cutting (below)
    model.eval()
    if tensor_group is not None:
        model.shard(tensor_group)
    if not lazy:
        for _, layer in model.model.decoder.local_layers():  # a split layer's whole tensors
            mx.eval(layer.parameters())  # are read before it is cut: one layer at a time
        mx.eval(model.parameters())
    model.path = path
    model.generation_config = generation_config
    model.processor_config = load_processor_config(path)
    return model


def load_processor_config(path: Path) -> dict:
    """The image processor's soft-token budget, from preprocessor_config.json or the
    processor_config.json Gemma 4 checkpoints carry; {} when neither names one."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = Path(path) / name
        if not f.exists():
            continue
        cfg = read_json(f, ConfigError)
        if not isinstance(cfg, dict):
            raise ConfigError(f"{f} must hold a JSON object (got {describe(cfg)})")
        nested = cfg.get("image_processor") if isinstance(cfg.get("image_processor"), dict) else {}
        n = (
            cfg.get("max_soft_tokens")
            or nested.get("max_soft_tokens")
            or cfg.get("image_seq_length")
        )
        if n is None:
            continue
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(
                f"{f}: max_soft_tokens must be a positive integer (got {describe(n)})"
            )
        return {"max_soft_tokens": n}
    return {}


def load_generation_config(path: Path) -> dict:
    """generation_config.json with `null` fields dropped (null means unset), after checking
    the values generation uses: sampler settings, EOS and pad ids."""
    f = Path(path) / "generation_config.json"
    if not f.exists() and not f.is_symlink():
        return {}
    cfg = read_json(f, ConfigError)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{f.name} must hold a JSON object (got {describe(cfg)})")
    cfg = {k: v for k, v in cfg.items() if v is not None}
    try:
        SamplerSettings.resolve(cfg)
        for key in ("eos_token_id", "pad_token_id"):
            if key in cfg:
                check_token_ids(key, cfg[key])
    except ValueError as e:
        raise ConfigError(f"{f.name}: {e}") from None
    return cfg


def check_tokenizer_files(path: Path):
    """A tokenizer file is there and readable. Without one, transformers builds an empty
    tokenizer that turns every prompt into <unk>: refused here instead."""
    for name in TOKENIZER_FILES:
        f = path / name
        if f.is_symlink() and not f.exists():
            raise CheckpointError(f"{f} is a broken link: the tokenizer cannot be read")
        if f.exists() and not f.is_file():
            raise CheckpointError(f"{f} is not a regular file")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path} has no tokenizer (neither {' nor '.join(TOKENIZER_FILES)}): text prompts "
            "need one; copy the original model's tokenizer files there (token ids need none: "
            "load_model loads the model alone)"
        )


def load(
    path_or_hub_id,
    dtype: Optional[mx.Dtype] = None,
    adapter_path: Optional[Union[str, Path]] = None,
    **sharding,
) -> Tuple[Model, "TokenizerWrapper"]:
    """(model, tokenizer) like `mlx_lm.load`: the tokenizer is mlx-lm's TokenizerWrapper with
    every EOS id from generation_config.json; `adapter_path` adds fine-tuned adapters (a folder
    written by `mlx_diffusiongemma.lora`). A folder without a tokenizer is refused (for token
    ids alone, `load_model` needs none). `sharding`: `load_model`'s groups (`sharded_load`)."""
    path = resolve_path(path_or_hub_id, tokenizer=True)
    read_config(path)  # a folder that is no model at all is named as such first
    check_tokenizer_files(path)
    if adapter_path is not None and any(v is not None for v in sharding.values()):
        raise ValueError(
            "adapters cannot be added to a model split across ranks yet: fuse them into the "
            "checkpoint first (python -m mlx_diffusiongemma.fuse)"
        )
    model = load_model(path, dtype=dtype, **sharding)
    if adapter_path is not None:
        from .tuner.adapters import load_adapters

        load_adapters(model, adapter_path)
        model.eval()
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    try:
        tokenizer = load_tokenizer(path, eos_token_ids=model.eos_token_ids())
    except Exception as e:  # tokenizers and transformers raise many classes for a bad file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: the tokenizer cannot be loaded ({reason})") from None
    n, vocab = len(tokenizer.get_vocab()), model.args.vocab_size
    if n > vocab:  # its ids past the embedding would fail on every prompt that uses them
        raise CheckpointError(
            f"{path}: the tokenizer has {n} tokens, more than the model's vocabulary of {vocab} "
            "(the tokenizer of another model?)"
        )
    return model, tokenizer
