"""Encoded images: format from magic bytes, and decoding that refuses image bombs (PIL and
numpy only: the converter's worker processes need no torch).

An image's size is read from its header before any pixel is decoded, so a 20,000 x 20,000 PNG
in a TSV row or a shard costs a few bytes of header, not gigabytes of memory.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image

# 64 megapixels: above any photo in ImageNet-like data (the largest ImageNet train image is
# about 37 MP), far below what would exhaust memory (a decoded RGB 64 MP image is 192 MB)
MAX_PIXELS = 64_000_000
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class ImageError(ValueError):
    """Bytes that are not a decodable image, or an image too large to decode."""


def image_extension(data: bytes) -> str | None:
    """File extension of an encoded image from its magic bytes, or None if not recognised."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `data` reading its header only; refuse more than `max_pixels` pixels.

    Raises:
        ImageError: not an image PIL can open, or too many pixels (nothing was decoded).
    """
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit and raises above twice it: ours is stricter anyway
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(found.group(1)):,}" if found else "too many"
        raise ImageError(f"image of {pixels} pixels refused before decoding (more than "
                         f"{max_pixels:,}; a decompression bomb or a wrong file)") from None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageError(f"not a decodable image ({type(err).__name__}: {err})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(f"image of {width} x {height} = {width * height:,} pixels refused "
                         f"before decoding (more than {max_pixels:,}; a decompression bomb or a "
                         f"wrong file)")
    return image


def verify_image(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    """Fully decode `data` (a header check misses truncated pixel data) and return the extension
    its bytes should be stored under.

    Raises:
        ImageError: unreadable, truncated or too large.
    """
    with open_image(data, max_pixels) as image:
        pil_format = image.format or ""
        try:
            image.load()
        except Exception as err:
            raise ImageError(f"not a decodable image ({type(err).__name__}: {err})") from None
    return image_extension(data) or _pil_extension(pil_format)


def _pil_extension(pil_format: str) -> str:
    Image.init()
    for ext, fmt in sorted(Image.EXTENSION.items()):
        if fmt == pil_format:
            return ext.lstrip(".")
    return pil_format.lower()


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Encoded image bytes -> a decoded PIL image, mode "L" for grayscale sources, else "RGB"
    (what the augmentations in `transforms.py` take).

    Raises:
        ImageError: unreadable, truncated or too large.
    """
    image = open_image(data, max_pixels)
    try:
        image.load()
        mode = "L" if image.mode in GRAY_MODES else "RGB"
        return image if image.mode == mode else image.convert(mode)
    except Exception as err:
        raise ImageError(f"not a decodable image ({type(err).__name__}: {err})") from None


def decode_pixels(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> `uint8 (H, W)` for grayscale sources, else `(H, W, 3)` RGB.

    Raises:
        ImageError: unreadable, truncated or too large.
    """
    with open_image(data, max_pixels) as image:
        try:
            return np.asarray(image.convert("L" if image.mode in GRAY_MODES else "RGB"))
        except Exception as err:
            raise ImageError(f"not a decodable image ({type(err).__name__}: {err})") from None
