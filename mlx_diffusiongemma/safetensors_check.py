"""Reads and checks safetensors headers without reading tensor data, so a truncated, corrupt or
hostile file fails with its name before anything is loaded."""

import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Dict, Tuple

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# What the model computes with. MLX reads F8_E4M3 as raw bytes and refuses a whole file that
# holds an F64 or F8_E5M2 tensor.
FLOAT_DTYPES = ("F32", "F16", "BF16")
MLX_UNREADABLE = ("F64", "F8_E5M2")
HEADER_LIMIT = 100_000_000  # bytes; as the safetensors library's own limit


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file or tensor."""


def open_regular(path: Path):
    """Opens `path` for reading only if it is a regular file (after links): a FIFO or device
    named like a weight file would block or stream forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        reason = "a broken link" if os.path.islink(path) else e.strerror
        raise CheckpointError(f"{path.name}: cannot read ({reason})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path.name}: not a regular file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot read ({e.strerror})") from None


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_header(path: Path) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, after checking every entry as the
    safetensors format defines it: integer, non-negative offsets whose spans tile the data
    section exactly (no overlap, no gap, nothing after the last tensor), sizes matching dtype
    and shape, and a `__metadata__` of strings."""
    path = Path(path)
    with open_regular(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > HEADER_LIMIT:
                raise CheckpointError(f"{path.name}: corrupt safetensors header (length {n})")
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path.name}: corrupt safetensors header ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{path.name}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        raise CheckpointError(f"{path.name}: __metadata__ must be an object of strings")
    data_len = size - 8 - n
    out, spans = {}, []
    for name, info in header.items():
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{path.name}: corrupt header entry for {name}") from None
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{path.name}: tensor {name} has a bad shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]
        ):
            raise CheckpointError(
                f"{path.name}: tensor {name} has bad data_offsets {offsets!r} "
                "(expected [begin, end], integers with 0 <= begin <= end)"
            )
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        if dtype in MLX_UNREADABLE:
            raise CheckpointError(
                f"{path.name}: tensor {name} is {dtype}, which MLX cannot read "
                "(cast the checkpoint to float32 or bfloat16 first)"
            )
        begin, end = offsets
        if end > data_len:
            raise CheckpointError(
                f"{path.name}: truncated file (tensor {name} ends at byte {end}, "
                f"file holds {data_len} data bytes)"
            )
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(
                f"{path.name}: tensor {name} size does not match its shape {tuple(shape)}"
            )
        out[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))
    _check_tiling(path, spans, data_len)
    return out


def _check_tiling(path: Path, spans, data_len: int):
    """Tensor bytes must follow each other from 0 to the end of the file: two tensors sharing
    bytes would load silently as aliases of one another."""
    at, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < at:
            raise CheckpointError(
                f"{path.name}: tensors {previous} and {name} overlap (data_offsets)"
            )
        if begin > at:
            raise CheckpointError(
                f"{path.name}: {begin - at} unused bytes before tensor {name} (data_offsets)"
            )
        at, previous = end, name
    if at != data_len:
        raise CheckpointError(f"{path.name}: {data_len - at} bytes after the last tensor")


def check_dtype(name: str, dtype: str, quantized: bool, file_name: str):
    """The dtypes the model takes for a tensor: floats (F32, F16, BF16) for weights, norms and
    scalars; packed U32 for a quantized weight; float or U8 (mx modes) for its scales.
    `quantized`: the tensor's module has `.scales` in the checkpoint."""
    if name.endswith(".weight") and quantized:
        allowed = ("U32",)
    elif name.endswith(".scales"):
        allowed = FLOAT_DTYPES + ("U8",)
    else:
        allowed = FLOAT_DTYPES
    if dtype not in allowed:
        raise CheckpointError(
            f"{file_name}: tensor {name} is {dtype}; the model takes {' or '.join(allowed)}"
        )
