"""Fashion-MNIST from the gzip-compressed IDX files Debian ships (`dataset-fashion-mnist`).

IDX layout (LeCun's MNIST format, shared by Fashion-MNIST): a big-endian header
`0x00 0x00 <dtype> <ndim>` followed by `ndim` big-endian uint32 sizes, then the raw values.
Images are `(N, 28, 28)` uint8 (dtype 0x08, ndim 3), labels `(N,)` uint8 (dtype 0x08, ndim 1).
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from seed_core.io import UserError

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"

# Zalando's label order: line i of labelmap.txt is label i
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# split -> (images file, labels file); "test" is the official 10k test set (our `val`)
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
IMAGE_SIDE = 28

_INSTALL_HINT = ("install it with `apt-get install dataset-fashion-mnist` or point "
                 "`data.source_dir` in params.yaml at a directory holding the four IDX .gz files")


class FashionMnistError(UserError, ValueError):
    """An IDX file is corrupt, truncated or inconsistent with its partner file."""


def _read_gz(path: Path) -> bytes:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: Fashion-MNIST directory not found; "
                                f"{_INSTALL_HINT}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Fashion-MNIST file not found; {_INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise FashionMnistError(f"{path}: not a complete gzip file ({err}); the download is "
                                f"corrupt or truncated: reinstall it") from None


def parse_idx(data: bytes, expected_magic: int, name: str = "<bytes>") -> np.ndarray:
    """Parse uncompressed IDX bytes of unsigned bytes.

    Args:
        data: the whole decompressed file.
        expected_magic: `IMAGES_MAGIC` or `LABELS_MAGIC`.
        name: file name used in error messages.

    Returns:
        uint8 array of the shape the header declares, e.g. `(N, 28, 28)` or `(N,)`.
    """
    if len(data) < 4:
        raise FashionMnistError(f"{name}: truncated IDX header ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise FashionMnistError(f"{name}: bad IDX magic number 0x{magic:08x}, expected "
                                f"0x{expected_magic:08x}; the file is corrupt or not this kind")
    ndim = magic & 0xFF
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes:
        raise FashionMnistError(f"{name}: truncated IDX header ({len(data)} of {header_bytes} "
                                f"bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header_bytes])
    expected = header_bytes + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "has trailing bytes"
        raise FashionMnistError(f"{name}: {state}: {len(data)} bytes, the header {shape} needs "
                                f"{expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(shape)


def read_images(path: str | Path) -> np.ndarray:
    """Images of one `*-images-idx3-ubyte.gz` file as `(N, 28, 28)` uint8."""
    path = Path(path)
    images = parse_idx(_read_gz(path), IMAGES_MAGIC, str(path))
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise FashionMnistError(f"{path}: images are {images.shape[1]}x{images.shape[2]}, "
                                f"expected {IMAGE_SIDE}x{IMAGE_SIDE}")
    return images


def read_labels(path: str | Path) -> np.ndarray:
    """Labels of one `*-labels-idx1-ubyte.gz` file as `(N,)` uint8 in [0, 10)."""
    path = Path(path)
    labels = parse_idx(_read_gz(path), LABELS_MAGIC, str(path))
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        bad = int(np.argmax(labels >= len(CLASS_NAMES)))
        raise FashionMnistError(f"{path}: label {int(labels[bad])} at index {bad} is out of "
                                f"range [0, {len(CLASS_NAMES)})")
    return labels


def load_split(source_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images `(N, 28, 28)` uint8 and labels `(N,)` uint8 of `split` ("train" or "test")."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r} (known: {', '.join(SPLIT_FILES)})")
    source_dir = Path(source_dir)
    images_name, labels_name = SPLIT_FILES[split]
    images = read_images(source_dir / images_name)
    labels = read_labels(source_dir / labels_name)
    if len(images) != len(labels):
        raise FashionMnistError(f"{source_dir}: {images_name} holds {len(images)} images but "
                                f"{labels_name} holds {len(labels)} labels")
    return images, labels


def _class_quotas(counts: dict[int, int], limit: int) -> dict[int, int]:
    """Spread `limit` as evenly as possible over classes, capped by each class's size; the
    remainder of an uneven split goes to the lowest class ids."""
    quotas = dict.fromkeys(counts, 0)
    remaining = limit
    while remaining > 0:
        open_classes = sorted(c for c in counts if quotas[c] < counts[c])
        share, extra = divmod(remaining, len(open_classes))
        for rank, cls in enumerate(open_classes):
            want = share + (1 if rank < extra else 0)
            given = min(want, counts[cls] - quotas[cls])
            quotas[cls] += given
            remaining -= given
    return quotas


def balanced_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Deterministic class-balanced subset of sample indices.

    Args:
        labels: `(N,)` integer class labels.
        limit: number of samples to keep; 0 keeps all.
        seed: seed of the per-class random choice.

    Returns:
        `(limit,)` int64 indices into `labels`, sorted ascending.
    """
    labels = np.asarray(labels)
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0 = all), got {limit}")
    if limit == 0:
        return np.arange(len(labels), dtype=np.int64)
    if limit > len(labels):
        raise ValueError(f"limit {limit} exceeds the {len(labels)} available samples")
    classes, counts = np.unique(labels, return_counts=True)
    quotas = _class_quotas({int(c): int(n) for c, n in zip(classes, counts)}, limit)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == cls))[:quotas[cls]]
              for cls in sorted(quotas)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def encode_png(image: np.ndarray) -> bytes:
    """Encode one `(H, W)` uint8 grayscale image as PNG bytes."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W) uint8 image, got {image.shape} {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_key(split: str, index: int) -> str:
    """TSV key of sample `index` of the original `split` file, e.g. `fmnist_train_000123`."""
    return f"fmnist_{split}_{index:06d}"


def iter_records(images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                 split: str) -> Iterator[tuple[str, int, bytes]]:
    """`(key, label, PNG bytes)` for each of `indices`, ready for `seed_core.tsv.write_tsv`.

    Args:
        images: `(N, 28, 28)` uint8.
        labels: `(N,)` labels.
        indices: indices to export, in output order.
        split: original split name used in the keys ("train" or "test").
    """
    for index in indices:
        yield sample_key(split, int(index)), int(labels[index]), encode_png(images[index])


def class_counts(labels: np.ndarray) -> dict[str, int]:
    """Samples per class name, in label order."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(CLASS_NAMES))
    return {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)}
