"""Images into the tower's patches, as transformers' Gemma 4 image processor (PIL backend) makes
them: RGB, bicubic resize keeping the aspect ratio to sides that are multiples of
pooling_kernel_size × patch_size with at most max_soft_tokens × k² patches, rescale by 1/255 (no
mean/std), patchify (row, column, channel), pad to the budget with (-1, -1) positions.

`load_image` reads what users and the server are given: a path, an http(s) URL, a data URL, a
PIL image or an array; every bad input is a ValueError with a one-line message.
"""

import base64
import binascii
import io
import math
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKENS = 280
URL_TIMEOUT_S = 20.0
MAX_IMAGE_BYTES = 32 << 20


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ValueError("images need Pillow: pip install Pillow") from None
    return Image, ImageOps


def _open_bytes(data: bytes, what: str):
    Image, ImageOps = _pil()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError:
        raise ValueError(f"{what}: the image has too many pixels") from None
    except Exception as e:  # PIL raises many classes for a file that is not an image
        raise ValueError(f"{what} is not a readable image ({type(e).__name__})") from None
    # As transformers' load_image: upright by its EXIF orientation, then RGB.
    return ImageOps.exif_transpose(image).convert("RGB")


def _fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mlx-diffusiongemma"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            size = response.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > max_bytes:
                raise ValueError(f"image at {url} is larger than {max_bytes} bytes")
            data = response.read(max_bytes + 1)
    except ValueError:
        raise
    except Exception as e:  # URLError, HTTPError, timeouts, refused connections
        reason = getattr(e, "reason", None) or e
        raise ValueError(f"could not fetch image {url} ({reason})") from None
    if len(data) > max_bytes:
        raise ValueError(f"image at {url} is larger than {max_bytes} bytes")
    return data


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ValueError("a data URL must look like data:image/<type>;base64,<data>")
    if len(payload) * 3 // 4 > max_bytes:
        raise ValueError(f"data URL image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("data URL image is not valid base64") from None


def load_image(source, timeout: float = URL_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES):
    """A PIL image (RGB for files and URLs) from a path, an http(s) URL (within `timeout`
    seconds and `max_bytes`), a data URL (`data:image/...;base64,...`), a PIL image (kept as
    is: the processor composites transparency on white) or an (H, W, C) / (C, H, W) array."""
    Image, _ = _pil()
    if isinstance(source, Image.Image):
        return source
    if hasattr(source, "__array__") and not isinstance(source, (str, bytes, Path)):
        return _array_to_pil(np.asarray(source))
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise ValueError(
            f"an image must be a path, a URL, a PIL image or an array, not {type(source).__name__}"
        )
    if source.startswith(("http://", "https://")):
        return _open_bytes(_fetch(source, timeout, max_bytes), f"image at {source}")
    if source.startswith("data:"):
        return _open_bytes(_decode_data_url(source, max_bytes), "data URL image")
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"image file {source} does not exist")
    if path.stat().st_size > max_bytes:
        raise ValueError(f"image file {source} is larger than {max_bytes} bytes")
    return _open_bytes(path.read_bytes(), f"image file {source}")


def _array_to_pil(a: np.ndarray):
    """An (H, W[, C]) or (C, H, W) array of uint8, or of floats in [0, 1], as a PIL image."""
    Image, _ = _pil()
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise ValueError(
            f"an image array must be (H, W), (H, W, 3|4) or (3|4, H, W), got shape {a.shape}"
        )
    if np.issubdtype(a.dtype, np.floating):
        if a.min() < 0 or a.max() > 1:
            raise ValueError("a float image array must hold values in [0, 1]")
        a = np.round(a * 255)
    elif not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() > 255:
        raise ValueError("an integer image array must hold values in [0, 255]")
    return Image.fromarray(a.astype(np.uint8))


def to_rgb(image) -> np.ndarray:
    """(H, W, 3) uint8, transparency composited on white (transformers' convert_to_rgb)."""
    Image, _ = _pil()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return np.array(image.convert("RGB"))


def target_size(height: int, width: int, patch_size: int, max_patches: int, k: int):
    """The reference's `get_aspect_ratio_preserving_size`: the largest sides that are multiples
    of k · patch_size with at most `max_patches` patches, aspect ratio kept."""
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = k * patch_size
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ValueError(f"cannot resize a {width}x{height} image to whole {side}-pixel blocks")
    longest = (max_patches // k**2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    if th * tw > target_px:
        raise ValueError(f"a {width}x{height} image cannot fit {max_patches} patches")
    return th, tw


@dataclass
class ProcessedImages:
    pixel_values: np.ndarray  # (B, max_patches, 3·p²) float32 in [0, 1]
    image_position_ids: np.ndarray  # (B, max_patches, 2) int64 (x, y), -1 for padding
    num_soft_tokens: List[int]  # soft tokens (= prompt <|image|> tokens) per image


class ImageProcessor:
    """Gemma 4's image processor (PIL backend). `max_soft_tokens` bounds each image's soft
    tokens (one of 70, 140, 280, 560, 1120)."""

    def __init__(
        self,
        patch_size: int = 16,
        pooling_kernel_size: int = 3,
        max_soft_tokens: int = DEFAULT_SOFT_TOKENS,
    ):
        if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ValueError(
                f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens}"
            )
        self.patch_size, self.k = patch_size, pooling_kernel_size
        self.max_soft_tokens = max_soft_tokens

    @classmethod
    def for_model(cls, model, max_soft_tokens=None) -> "ImageProcessor":
        """The checkpoint's tower shape and its processor config's soft-token default."""
        vision = model.args.vision
        if vision is None:
            raise ValueError(
                "this checkpoint has no vision tower (a text-only conversion): "
                "it cannot read images"
            )
        if max_soft_tokens is None:
            max_soft_tokens = model.processor_config.get("max_soft_tokens", DEFAULT_SOFT_TOKENS)
        return cls(vision.patch_size, vision.pooling_kernel_size, int(max_soft_tokens))

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.k**2

    def patches(self, image):
        """(patches (n, 3·p²) float32, positions (n, 2) int64) of one image."""
        Image, _ = _pil()
        rgb = to_rgb(load_image(image))
        h, w = rgb.shape[:2]
        th, tw = target_size(h, w, self.patch_size, self.max_patches, self.k)
        if (th, tw) != (h, w):
            rgb = np.array(Image.fromarray(rgb).resize((tw, th), resample=Image.BICUBIC))
        pixels = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)  # (H, W, 3)
        p = self.patch_size
        ph, pw = th // p, tw // p
        patches = pixels.reshape(ph, p, pw, p, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)
        gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
        return patches, np.stack([gx, gy], axis=-1).reshape(ph * pw, 2).astype(np.int64)

    def __call__(self, images: Sequence) -> ProcessedImages:
        if not images:
            raise ValueError("no images given")
        n = self.max_patches
        pixel_values = np.zeros((len(images), n, 3 * self.patch_size**2), dtype=np.float32)
        positions = np.full((len(images), n, 2), -1, dtype=np.int64)
        counts = []
        for i, image in enumerate(images):
            patches, pos = self.patches(image)
            pixel_values[i, : len(patches)] = patches
            positions[i, : len(patches)] = pos
            counts.append(len(patches) // self.k**2)
        return ProcessedImages(pixel_values, positions, counts)
