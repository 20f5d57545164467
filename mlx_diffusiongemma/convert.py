"""Converts a Hugging Face DiffusionGemma checkpoint to an MLX folder, optionally quantized.

    python -m mlx_diffusiongemma.convert --hf-path google/diffusiongemma-26B-A4B-it \\
        --mlx-path diffusiongemma-4bit -q

Memory stays bounded by about one tensor whatever the model or shard size: every tensor is read
lazily from its source shard, cast / quantized on its own and written straight into its output
shard, whose header is planned beforehand from the lazy shapes. The output keeps the Hugging
Face key names (the mlx-community / mlx-vlm layout): one copy of the shared encoder/decoder
weights, the encoder's own layer scalars, the vision tower copied through unless --text-only,
an mlx-lm `quantization` block in config.json. It is written to a hidden temporary folder next
to the destination and renamed into place only when complete.
"""

import argparse
import dataclasses
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx

from . import quant
from .cli import OneLineParser, run_cli
from .config import ModelArgs
from .loader import (
    TOKENIZER_FILES,
    TOKENIZER_PATTERNS,
    WEIGHT_PATTERNS,
    check_weights,
    hub_download,
    load_generation_config,
    read_config,
    read_headers,
    resolve_path,
)
from .model import VISION_PREFIXES, Model
from .safetensors_check import CheckpointError

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
ST_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.uint16: "U16",
    mx.uint8: "U8",
    mx.int64: "I64",
    mx.int32: "I32",
    mx.int16: "I16",
    mx.int8: "I8",
    mx.uint64: "U64",
    mx.bool_: "BOOL",
}
# Copied as they are: tokenizer, chat template, generation and processor configs.
COPIED = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken")
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 2**10,
    "KIB": 2**10,
    "M": 2**20,
    "MB": 2**20,
    "MIB": 2**20,
    "G": 2**30,
    "GB": 2**30,
    "GIB": 2**30,
}


class ConvertError(ValueError):
    """A conversion that cannot be done as asked (the message says why)."""


def parse_size(text: str) -> int:
    """'5GB' -> bytes. Units are binary (GB = GiB), as mlx-lm's shard limit."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MB, 100000)")
    size = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


# ---- source ----------------------------------------------------------------------------------
def source_path(hf_path: str, revision=None) -> Path:
    """A local folder, or a hub id downloaded (weights, configs, tokenizer, chat template)."""
    local = Path(hf_path).expanduser()
    if local.exists() or hf_path.count("/") != 1 or hf_path.startswith((".", "/", "~")):
        return resolve_path(local)
    patterns = WEIGHT_PATTERNS + TOKENIZER_PATTERNS + list(COPIED) + ["README.md"]
    return hub_download(hf_path, patterns, revision)


def files_to_copy(src: Path) -> list:
    """The files copied as they are (tokenizer, chat template, configs), checked before any
    work is done: one that cannot be copied (a broken link, a FIFO) is an error, never a
    silent omission that would leave a folder loading half-right."""
    files = []
    for pattern in COPIED:
        for f in sorted(src.glob(pattern)):
            if f.name == "config.json" or f.name.endswith(".index.json"):
                continue
            if f.is_symlink() and not f.exists():
                raise ConvertError(
                    f"cannot copy {f.name}: it is a broken link (to {os.readlink(f)})"
                )
            if not f.is_file():
                raise ConvertError(f"cannot copy {f.name}: not a regular file")
            if not os.access(f, os.R_OK):
                raise ConvertError(f"cannot copy {f.name}: not readable")
            files.append(f)
    return files


def plan(src: Path, args: ModelArgs, dtype=None, qdefault=None, recipe="mixed", text_only=False):
    """Every output tensor as a lazy array, grouped per source tensor (a quantized weight with
    its scales and biases), plus the per-module overrides of the quantization block and the
    parameter count. Nothing is read or computed yet; shapes, names and dtypes are checked."""
    # lazy: never evaluated, only its module tree and shapes are used; the tower's tensors are
    # copied through as they are, so only the text tree is checked
    model = Model(dataclasses.replace(args, vision=None))
    modules = dict(model.named_modules())
    groups, overrides, text_shapes, n_params = [], {}, {}, 0
    for f, header in read_headers(src).items():
        if not header:
            continue
        if any(k.endswith(".scales") for k in header):
            raise ConvertError(
                f"{src} is already quantized (MLX); convert from the bf16 Hugging Face checkpoint"
            )
        try:
            arrays = mx.load(str(f))
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f.name}: cannot be read ({e})") from None
        for key in header:
            value = arrays.pop(key)
            vision = key.startswith(VISION_PREFIXES)
            if vision and text_only:
                continue
            # The text tree goes through the loader's own mapping (drops tied copies and rotary
            # buffers, names the expert weights), so whatever it writes, it loads.
            out = {key: value} if vision else model.sanitize({key: value})
            for name, arr in out.items():
                n_params += arr.size
                if not vision:
                    text_shapes[name] = SimpleNamespace(shape=arr.shape)
                if (
                    dtype is not None
                    and mx.issubdtype(arr.dtype, mx.floating)
                    and arr.dtype != dtype
                ):
                    arr = arr.astype(dtype)
                path, params = name.rsplit(".", 1)[0], None
                if (
                    qdefault
                    and not vision
                    and name.endswith(".weight")
                    and hasattr(modules.get(path), "to_quantized")
                ):
                    params = quant.module_params(path, arr.shape[-1], qdefault, recipe)
                if params:
                    q = mx.quantize(arr, params["group_size"], params["bits"], mode=params["mode"])
                    groups.append(
                        list(zip([f"{path}.weight", f"{path}.scales", f"{path}.biases"], q))
                    )
                    if params != qdefault:
                        overrides[path] = params
                else:
                    groups.append([(name, arr)])
        del arrays
    check_weights(model, text_shapes)
    return groups, overrides, n_params


def shard(groups, max_bytes: int):
    """Greedy split into shards of at most max_bytes (a bigger tensor gets a shard of its own)."""
    shards, size = [], 0
    for g in groups:
        n = sum(a.nbytes for _, a in g)
        if not shards or size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(g)
        size += n
    return shards


def write_safetensors(path: Path, entries: list, progress=None):
    """Writes a safetensors file tensor by tensor: the header first (from lazy shapes), then
    each tensor evaluated, written and released. `entries` is emptied as it goes."""
    header, off = {"__metadata__": {"format": "mlx"}}, 0
    for name, a in entries:
        header[name] = {
            "dtype": ST_DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [off, off + a.nbytes],
        }
        off += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for i in range(len(entries)):
            name, a = entries[i]
            entries[i] = None
            a = mx.contiguous(a)
            mx.eval(a)
            f.write(memoryview(a))
            if progress:
                progress(a.nbytes)
            del a
            mx.clear_cache()


# ---- output folder ---------------------------------------------------------------------------
def check_destination(out: Path, force: bool):
    if out.exists():
        if not out.is_dir():
            raise ConvertError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            if not force:
                raise ConvertError(
                    f"{out} already exists and is not empty (pass --force to replace it)"
                )
            if not (out / "config.json").exists():
                raise ConvertError(
                    f"--force replaces only a model folder, and {out} has no config.json; remove it yourself"
                )


def _remove_stale_partials(out: Path):
    """Temporary folders of earlier runs that were killed (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            os.kill(int(p.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def output_config(config: dict, args: ModelArgs, qblock, dtype_name, text_only) -> dict:
    config = dict(config)
    # transformers 5.23 writes full-attention shapes only under per_layer_config; mlx-vlm reads
    # global_head_dim / num_global_key_value_heads (as the released checkpoint has them).
    text = config["text_config"] = dict(config.get("text_config") or {})
    full = [i for i, t in enumerate(args.layer_types) if t == "full_attention"]
    for key, values in (
        ("global_head_dim", args.layer_head_dims),
        ("num_global_key_value_heads", args.layer_kv_heads),
    ):
        found = {values[i] for i in full}
        if text.get(key) is None and len(found) == 1:
            text[key] = found.pop()
    config.pop("_name_or_path", None)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if text_only:
        config.pop("vision_config", None)
    if dtype_name:
        for k in ("dtype", "torch_dtype"):
            if k in config:
                config[k] = dtype_name
    if qblock:
        config["quantization"] = qblock
        config["quantization_config"] = qblock  # what mlx-lm writes too (Hugging Face tree)
    return dict(sorted(config.items()))


def model_card(title: str, src_name: str, src: Path, summary: str, hub: bool, where: str) -> str:
    try:
        from importlib.metadata import version

        ours = f"mlx-diffusiongemma {version('mlx-diffusiongemma')}"
    except Exception:
        ours = "mlx-diffusiongemma"
    front = [
        "library_name: mlx",
        "pipeline_tag: text-generation",
        "tags:",
        "- mlx",
        "- diffusiongemma",
    ]
    if hub:
        front.insert(0, f"base_model: {src_name}")
    readme = src / "README.md"
    if readme.exists():
        lic = re.search(r"^license:\s*(\S+)", readme.read_text(errors="replace"), re.M)
        if lic:
            front.append(f"license: {lic.group(1)}")
    link = f"[{src_name}](https://huggingface.co/{src_name})" if hub else f"`{src_name}`"
    return "\n".join(
        [
            "---",
            *front,
            "---",
            "",
            f"# {title}",
            "",
            f"{link} converted to MLX with {ours}: {summary}.",
            "Tensors keep the Hugging Face names (the mlx-community / mlx-vlm layout).",
            "",
            "```python",
            "from mlx_diffusiongemma import load",
            "",
            f'model, tokenizer = load("{where}")',
            "```",
            "",
        ]
    )


def check_source(src: Path, out: Path, log):
    """The source's config (and its parsed form) once it is known to be convertible."""
    if src.resolve() == out.resolve() or out.resolve() in src.resolve().parents:
        raise ConvertError(f"the destination {out} would replace the source {src}")
    config = read_config(src)
    args = ModelArgs.from_config(config)
    if config.get("quantization") or config.get("quantization_config"):
        raise ConvertError(
            f"{src} is already quantized; convert from the bf16 Hugging Face checkpoint"
        )
    load_generation_config(src)
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        log(
            f"[WARN] {src} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): the converted "
            "model will take token ids only, until its tokenizer files are copied next to it"
        )
    return config, args


def describe(qdefault, quant_recipe, dtype, text_only, bits_per_weight) -> str:
    """The conversion in a line, for the log and the model card."""
    if qdefault:
        summary = (
            f"{qdefault['mode']} {qdefault['bits']}-bit (group {qdefault['group_size']}), "
            f"{quant_recipe} recipe"
            + (
                " (embeddings, attention, dense MLP and router at 8-bit)"
                if quant_recipe == "mixed"
                else ""
            )
            + f", {bits_per_weight:.2f} bits per weight"
        )
    else:
        summary = f"unquantized ({dtype or 'source dtype'})"
    return summary + (", text only (no vision tower)" if text_only else "")


def replace_folder(tmp: Path, out: Path):
    """Puts the finished folder `tmp` at `out`; an old `out` is kept until the rename
    succeeds, so `out` is never half-written and never lost."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def convert(
    hf_path,
    mlx_path="mlx_model",
    quantize=False,
    q_bits=None,
    q_group_size=None,
    q_mode="affine",
    quant_recipe="mixed",
    dtype=None,
    max_shard_size=5 << 30,
    text_only=False,
    force=False,
    upload_repo=None,
    revision=None,
    log=print,
) -> Path:
    """Converts `hf_path` (folder or hub id) into the folder `mlx_path`; returns its path."""
    qdefault = quant.resolve(q_bits, q_group_size, q_mode) if quantize else None
    if quantize and quant_recipe not in quant.RECIPES:
        raise ConvertError(
            f"unknown quantization recipe {quant_recipe!r} (choose from {', '.join(quant.RECIPES)})"
        )
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    out = Path(mlx_path).expanduser().absolute()
    check_destination(out, force)
    src = source_path(str(hf_path), revision)
    config, args = check_source(src, out, log)
    copied = files_to_copy(src)

    log(f"[INFO] Planning {src}")
    groups, overrides, n_params = plan(
        src, args, DTYPES.get(dtype), qdefault, quant_recipe, text_only
    )
    total = sum(a.nbytes for g in groups for _, a in g)
    shards = shard(groups, max_shard_size)
    del groups
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weight_map = {}
        from tqdm import tqdm

        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="Converting",
            file=sys.stderr,
            disable=None,
            leave=False,
        ) as bar:
            for name, entries in zip(names, shards):
                weight_map.update({k: name for k, _ in entries})
                write_safetensors(tmp / name, entries, bar.update)
        index = {
            "metadata": {"total_size": total, "total_parameters": n_params},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
        qblock = quant.config_block(qdefault, overrides) if quantize else None
        (tmp / "config.json").write_text(
            json.dumps(output_config(config, args, qblock, dtype, text_only), indent=4)
        )
        for f in copied:
            shutil.copy(f, tmp / f.name)
        summary = describe(qdefault, quant_recipe, dtype, text_only, total * 8 / max(n_params, 1))
        hub = not Path(str(hf_path)).expanduser().exists()
        (tmp / "README.md").write_text(
            model_card(
                upload_repo or out.name, str(hf_path), src, summary, hub, upload_repo or str(out)
            )
        )
        replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"[INFO] Wrote {out}: {len(names)} shard(s), {total / 2**30:.2f} GiB, {summary}")
    if upload_repo:
        upload(out, upload_repo)
        log(f"[INFO] Uploaded to https://huggingface.co/{upload_repo}")
    return out


def upload(path: Path, repo: str):
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_large_folder(folder_path=str(path), repo_id=repo, repo_type="model")
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(
            f"upload to {repo} failed ({reason}); the converted model is in {path}"
        ) from None


# ---- command line ----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="mlx_diffusiongemma.convert",
        description="Convert a Hugging Face DiffusionGemma checkpoint to MLX "
        "(optionally quantized).",
    )
    p.add_argument(
        "--hf-path", "--model", required=True, help="local folder or Hugging Face hub id"
    )
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, help="bits per weight (default: 4, 8 for mxfp8)")
    p.add_argument(
        "--q-group-size", type=int, help="group size (default: 64 affine, 32 mxfp4/mxfp8, 16 nvfp4)"
    )
    p.add_argument(
        "--q-mode",
        default="affine",
        choices=list(quant.MODE_DEFAULTS),
        help="quantization mode (default: affine)",
    )
    p.add_argument(
        "--quant-recipe",
        choices=quant.RECIPES,
        default="mixed",
        help="mixed (default, as mlx-community): embeddings, attention, dense MLP and router at "
        "8-bit affine, the rest at --q-bits; uniform: everything at --q-bits",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="dtype of the unquantized tensors and scales (default: as stored)",
    )
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=5 << 30,
        help="largest output shard (default: 5GB)",
    )
    p.add_argument("--text-only", action="store_true", help="leave out the vision tower")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--upload-repo", help="Hugging Face repo to upload the result to")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    given = [
        f for f, v in (("--q-bits", a.q_bits), ("--q-group-size", a.q_group_size)) if v is not None
    ]
    given += ["--q-mode"] * (a.q_mode != "affine") + ["--quant-recipe"] * (
        a.quant_recipe != "mixed"
    )
    if given and not a.quantize:
        p.error(f"{', '.join(given)} need -q/--quantize")

    def body():
        convert(
            a.hf_path,
            a.mlx_path,
            a.quantize,
            a.q_bits,
            a.q_group_size,
            a.q_mode,
            a.quant_recipe,
            a.dtype,
            a.max_shard_size,
            a.text_only,
            a.force,
            a.upload_repo,
            a.revision,
        )

    # `kill` cleans up like Ctrl-C: the temporary folder is removed, OUT is left as it was.
    return run_cli(body, interrupted="error: interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
