"""Model configuration read from a DiffusionGemma checkpoint's config.json."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .checks import check_bool, check_int, check_number, check_object, check_token_ids, describe

DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1_000_000.0,
    },
}


class ConfigError(ValueError):
    """A config.json that is not a usable DiffusionGemma configuration."""


def _config_error(message: str) -> ConfigError:
    return ConfigError(f"config.json: {message}")


# text_config keys the model reads, with their lowest value (ints are also capped at MLX's
# int32 shapes). null means unset: the default applies.
TEXT_INTS = dict(
    vocab_size=1,
    hidden_size=1,
    intermediate_size=1,
    num_hidden_layers=1,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=2,
    sliding_window=1,
    num_experts=1,
    top_k_experts=1,
    moe_intermediate_size=1,
    max_position_embeddings=1,
    global_head_dim=2,
    num_global_key_value_heads=1,
)
TEXT_BOOLS = ("attention_bias", "tie_word_embeddings", "attention_k_eq_v")
MAX_DIM = 2**31 - 1
ROPE_TYPES = ("default", "proportional")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")


def check_text_config(text: Dict[str, Any]):
    """Types and ranges of every text_config key the model reads, before any of them is used:
    a string where a number belongs, a zero head count or a null block is named here rather
    than failing later inside the model."""
    err = _config_error
    for key, lo in TEXT_INTS.items():
        if text.get(key) is not None:
            check_int(f"text_config.{key}", text[key], lo=lo, cap=MAX_DIM, exc=err)
    for key in TEXT_BOOLS:
        if text.get(key) is not None:
            check_bool(f"text_config.{key}", text[key], exc=err)
    if text.get("rms_norm_eps") is not None:
        check_number("text_config.rms_norm_eps", text["rms_norm_eps"], lo=0, lo_open=True, exc=err)
    if text.get("final_logit_softcapping") is not None:
        check_number(
            "text_config.final_logit_softcapping",
            text["final_logit_softcapping"],
            lo=0,
            lo_open=True,
            exc=err,
        )
    for key in ("eos_token_id", "pad_token_id"):
        if text.get(key) is not None:
            check_token_ids(f"text_config.{key}", text[key], exc=err)
    act = text.get("hidden_activation")
    if act is not None and act not in ACTIVATIONS:
        raise err(
            f"text_config.hidden_activation {act!r} is not supported "
            f"(expected one of {', '.join(ACTIVATIONS)})"
        )
    types = text.get("layer_types")
    if types is not None and not (
        isinstance(types, list) and all(isinstance(t, str) for t in types)
    ):
        raise err(f"text_config.layer_types must be a list of strings (got {describe(types)})")
    rope = text.get("rope_parameters")
    if rope is not None:
        check_object("text_config.rope_parameters", rope, exc=err)
        for kind, block in rope.items():
            if block is not None:
                check_rope_block(f"text_config.rope_parameters.{kind}", block)
    per_layer = text.get("per_layer_config")
    if per_layer is not None:
        check_object("text_config.per_layer_config", per_layer, exc=err)
        for key, overrides in per_layer.items():
            where = f"text_config.per_layer_config.{key}"
            check_object(where, overrides, exc=err)
            if overrides.get("head_dim") is not None:
                check_int(f"{where}.head_dim", overrides["head_dim"], lo=2, cap=MAX_DIM, exc=err)
            if overrides.get("num_key_value_heads") is not None:
                check_int(
                    f"{where}.num_key_value_heads",
                    overrides["num_key_value_heads"],
                    cap=MAX_DIM,
                    exc=err,
                )


def check_rope_block(where: str, block):
    err = _config_error
    check_object(where, block, exc=err)
    rope_type = block.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise err(
            f"{where}.rope_type {rope_type!r} is not supported "
            f"(expected one of {', '.join(ROPE_TYPES)})"
        )
    if "rope_theta" not in block:
        raise err(f"{where} has no rope_theta")
    check_number(f"{where}.rope_theta", block["rope_theta"], lo=0, lo_open=True, exc=err)
    if block.get("factor") is not None:
        check_number(f"{where}.factor", block["factor"], lo=0, lo_open=True, exc=err)
    prf = block.get("partial_rotary_factor")
    if prf is not None:
        check_number(f"{where}.partial_rotary_factor", prf, lo=0, hi=1, lo_open=True, exc=err)
        if rope_type == "default" and prf != 1:
            raise err(f"{where}: default RoPE with partial_rotary_factor < 1 is not supported")


def check_quantization(block) -> Optional[Dict[str, Any]]:
    """The mlx-lm `quantization` block: defaults, and per-module overrides (a dict of the same
    keys, or a bool). None when there is none, or when it is a transformers-side block
    without `bits` (nothing MLX can apply)."""
    from . import quant

    if block is None:
        return None
    check_object("quantization", block, exc=_config_error)
    if "bits" not in block:
        return None
    checked = set()
    for where, params in [("quantization", block)] + [
        (f"quantization.{k}", v) for k, v in block.items() if isinstance(v, dict)
    ]:
        key = tuple(params.get(k) for k in ("bits", "group_size", "mode"))
        if key in checked:
            continue
        if key[0] is None or key[1] is None:
            raise _config_error(f"{where} needs both bits and group_size")
        try:
            quant.resolve(*key[:2], mode=key[2] or "affine")
        except quant.QuantizationError as e:
            raise _config_error(f"{where}: {e}") from None
        checked.add(key)
    return block


@dataclass
class VisionArgs:
    """The Gemma 4 vision tower (`vision_config`, model_type gemma4_vision); defaults are
    transformers' `Gemma4VisionConfig`."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_theta: float = 100.0
    hidden_activation: str = "gelu_pytorch_tanh"

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "VisionArgs":
        known = set(cls.__dataclass_fields__) - {"rope_theta"}
        kwargs = {k: v for k, v in config.items() if k in known and v is not None}
        rope = config.get("rope_parameters") or {}
        # transformers reads the tower's rope_type "default" as axial (2-D); nothing else exists
        if rope.get("rope_type", "default") not in ("default", "axial"):
            raise ConfigError(
                f"vision_config.rope_parameters.rope_type {rope['rope_type']!r} is not supported"
            )
        if "rope_theta" in rope:
            kwargs["rope_theta"] = float(rope["rope_theta"])
        act = kwargs.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ConfigError(f"vision_config.hidden_activation {act!r} is not supported")
        args = cls(**kwargs)
        if args.head_dim % 4:
            raise ConfigError(
                f"vision_config.head_dim {args.head_dim} is not a multiple of 4 (2-D RoPE)"
            )
        if args.num_attention_heads % args.num_key_value_heads:
            raise ConfigError(
                "vision_config.num_attention_heads is not a multiple of num_key_value_heads"
            )
        return args


@dataclass
class ModelArgs:
    """The text model of DiffusionGemma (encoder and decoder share it).

    Built with `ModelArgs.from_config(config_json_dict)`; per-layer attention shapes are resolved
    once here so the modules never look at raw config keys.
    """

    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024
    layer_types: List[str] = field(default_factory=list)
    rope_parameters: Dict[str, Dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_ROPE))
    final_logit_softcapping: Optional[float] = 30.0
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    max_position_embeddings: int = 262_144
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: Optional[int] = 0
    canvas_length: int = 256
    eos_token_id: Any = None
    # Per-layer (head_dim, num_key_value_heads); filled by __post_init__.
    layer_head_dims: List[int] = field(default_factory=list)
    layer_kv_heads: List[int] = field(default_factory=list)
    quantization: Optional[Dict[str, Any]] = None
    # The vision tower (None: a text-only checkpoint) and the prompt's image / video token ids.
    vision: Optional[VisionArgs] = None
    image_token_id: int = 258_880
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    video_token_id: int = 258_884

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = [
                "sliding_attention" if (i + 1) % 6 else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        # As the reference: the last layer is always full attention.
        self.layer_types = list(self.layer_types)
        self.layer_types[-1] = "full_attention"
        for t in self.layer_types:
            if t not in ("sliding_attention", "full_attention"):
                raise ConfigError(f"unknown layer type {t!r} in layer_types")
        if not self.layer_head_dims:
            self.layer_head_dims = [self.head_dim] * self.num_hidden_layers
        if not self.layer_kv_heads:
            self.layer_kv_heads = [self.num_key_value_heads] * self.num_hidden_layers
        for i, hd in enumerate(self.layer_head_dims):
            if hd % 2:
                raise ConfigError(f"layer {i}: head_dim {hd} is odd (RoPE rotates pairs)")
        for i, kv in enumerate(self.layer_kv_heads):
            if self.num_attention_heads % kv:
                raise ConfigError(
                    f"layer {i}: {self.num_attention_heads} attention heads is not a multiple "
                    f"of {kv} key/value heads"
                )
        if self.top_k_experts > self.num_experts:
            raise ConfigError(
                f"top_k_experts {self.top_k_experts} > num_experts {self.num_experts}"
            )

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "ModelArgs":
        """Reads the top-level `diffusion_gemma` config (or a bare text config); every error
        names config.json."""
        try:
            return cls._from_config(config)
        except ConfigError as e:
            if str(e).startswith("config.json"):
                raise
            raise _config_error(str(e)) from None

    @classmethod
    def _from_config(cls, config: Dict[str, Any]) -> "ModelArgs":
        check_object("the configuration", config, exc=_config_error)
        model_type = config.get("model_type")
        if model_type != "diffusion_gemma":
            raise ConfigError(
                f"model_type is {model_type!r}, expected 'diffusion_gemma' "
                "(a DiffusionGemma checkpoint such as google/diffusiongemma-26B-A4B-it)"
            )
        text = config.get("text_config")
        text = {} if text is None else dict(check_object("text_config", text, exc=_config_error))
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError(
                "use_bidirectional_attention='all' (bidirectional encoder) is not supported"
            )
        check_text_config(text)
        own = {
            "layer_head_dims",
            "layer_kv_heads",
            "quantization",
            "vision",
            "image_token_id",
            "boi_token_id",
            "eoi_token_id",
            "video_token_id",
        }
        known = set(cls.__dataclass_fields__) - own
        kwargs = {k: v for k, v in text.items() if k in known and v is not None}
        if "final_logit_softcapping" in text:  # null turns the softcap off, as in the reference
            kwargs["final_logit_softcapping"] = text["final_logit_softcapping"]
        canvas = config.get("canvas_length")
        kwargs["canvas_length"] = (
            256
            if canvas is None
            else check_int("canvas_length", canvas, cap=MAX_DIM, exc=_config_error)
        )
        if config.get("tie_word_embeddings") is not None:
            kwargs["tie_word_embeddings"] = check_bool(
                "tie_word_embeddings", config["tie_word_embeddings"], exc=_config_error
            )
        rope = dict(DEFAULT_ROPE)
        rope.update({k: v for k, v in (text.get("rope_parameters") or {}).items() if v is not None})
        kwargs["rope_parameters"] = rope
        quantization = config.get("quantization")
        if quantization is None:
            quantization = config.get("quantization_config")
        quantization = check_quantization(quantization)
        if kwargs.get("hidden_activation", "gelu_pytorch_tanh") not in (
            "gelu_pytorch_tanh",
            "gelu_new",
        ):
            raise ConfigError(f"hidden_activation {kwargs['hidden_activation']!r} is not supported")
        for key in ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id"):
            if config.get(key) is not None:
                kwargs[key] = check_int(key, config[key], lo=0, exc=_config_error)
        if config.get("vision_config"):
            vision = check_object("vision_config", config["vision_config"], exc=_config_error)
            kwargs["vision"] = VisionArgs.from_config(vision)
        args = cls(**kwargs)
        args.quantization = quantization
        args._resolve_full_attention_shapes(text)
        if args.canvas_length > args.max_position_embeddings:
            raise _config_error(
                f"canvas_length {args.canvas_length} exceeds max_position_embeddings "
                f"{args.max_position_embeddings}"
            )
        return args

    def _resolve_full_attention_shapes(self, text: Dict[str, Any]):
        """Head dims and kv heads of each layer, from `per_layer_config` (what transformers 5.23
        writes) or from `global_head_dim` / `num_global_key_value_heads` (the released checkpoint)."""
        per_layer = text.get("per_layer_config")
        head_dims = [self.head_dim] * self.num_hidden_layers
        kv_heads = [self.num_key_value_heads] * self.num_hidden_layers
        if per_layer is not None:  # present, even empty, means: no other overrides
            for key, overrides in per_layer.items():
                try:
                    idx = int(key)
                except (TypeError, ValueError):
                    idx = None
                targets = (
                    [idx]
                    if idx is not None
                    else [i for i, t in enumerate(self.layer_types) if t == key]
                )
                for i in targets:
                    if not 0 <= i < self.num_hidden_layers:
                        raise ConfigError(f"per_layer_config names layer {key}, out of range")
                    head_dims[i] = overrides.get("head_dim", head_dims[i])
                    kv_heads[i] = overrides.get("num_key_value_heads", kv_heads[i])
        else:
            global_head_dim = text.get("global_head_dim") or 512
            global_kv = text.get("num_global_key_value_heads")
            k_eq_v = text.get("attention_k_eq_v", True)
            for i, t in enumerate(self.layer_types):
                if t == "full_attention":
                    head_dims[i] = global_head_dim
                    if global_kv is not None and k_eq_v:
                        kv_heads[i] = global_kv
        self.layer_head_dims = head_dims
        self.layer_kv_heads = kv_heads
        self.__post_init__()
