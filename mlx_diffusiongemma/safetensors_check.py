"""Reads and checks safetensors headers without reading tensor data, so a truncated or corrupt
file fails with its name before anything is loaded."""

import json
import math
import struct
from pathlib import Path
from typing import Dict, Tuple

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file or tensor."""


def read_header(path: Path) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, after checking that every tensor's
    bytes lie inside the file and match its dtype and shape."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path.name}: corrupt safetensors header (length {n})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.name}: corrupt safetensors header ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header")
    data_len = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: corrupt header entry for {name}") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        if end > data_len:
            raise CheckpointError(
                f"{path.name}: truncated file (tensor {name} ends at byte {end}, "
                f"file holds {data_len} data bytes)"
            )
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path.name}: tensor {name} size does not match its shape {shape}")
        out[name] = (dtype, shape)
    return out
