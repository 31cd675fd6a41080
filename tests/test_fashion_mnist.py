"""Fashion-MNIST IDX parsing, the balanced subset, PNG encoding and the `fashion_mnist` stage."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seed_core.data import fashion_mnist as fm

REPO = Path(__file__).resolve().parents[1]
REAL_DIR = Path(fm.DEFAULT_SOURCE_DIR)
needs_real_data = pytest.mark.skipif(
    not all((REAL_DIR / name).is_file() for pair in fm.SPLIT_FILES.values() for name in pair),
    reason=f"{REAL_DIR} missing: apt-get install dataset-fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """Naive IDX encoder of a uint8 array: magic 0x0000 08 <ndim>, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_gz(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


def make_source(directory: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Path:
    """A tiny Fashion-MNIST directory: four gz IDX files with random images, labels i % 10."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = fm.SPLIT_FILES[split]
        write_gz(directory / images_name,
                 idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        write_gz(directory / labels_name, idx_bytes(np.arange(n, dtype=np.uint8) % 10))
    return directory


# --- the real files (known facts) ---------------------------------------------------------

@needs_real_data
def test_real_train_split_has_known_sizes_and_balance():
    images, labels = fm.load_split(REAL_DIR, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,)
    assert np.bincount(labels).tolist() == [6000] * 10
    # the first training images are an ankle boot, two T-shirts, a dress (Zalando's order)
    assert labels[:4].tolist() == [9, 0, 0, 3]


@needs_real_data
def test_real_test_split_has_known_sizes_and_balance():
    images, labels = fm.load_split(REAL_DIR, "test")
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [1000] * 10
    assert labels[:3].tolist() == [9, 2, 1]


def test_class_names_follow_zalando_order():
    assert len(fm.CLASS_NAMES) == 10
    assert fm.CLASS_NAMES[0] == "T-shirt/top" and fm.CLASS_NAMES[9] == "Ankle boot"
    assert fm.CLASS_NAMES[5] == "Sandal" and fm.CLASS_NAMES[8] == "Bag"


# --- synthetic IDX files ------------------------------------------------------------------

def test_synthetic_idx_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    np.testing.assert_array_equal(
        fm.read_images(write_gz(tmp_path / "i.gz", idx_bytes(images))), images)
    np.testing.assert_array_equal(
        fm.read_labels(write_gz(tmp_path / "l.gz", idx_bytes(labels))), labels)


def test_load_split_reads_a_synthetic_directory(tmp_path):
    source = make_source(tmp_path / "fm", n_train=30, n_test=12)
    images, labels = fm.load_split(source, "test")
    assert images.shape == (12, 28, 28)
    assert labels.tolist() == [i % 10 for i in range(12)]


def test_corrupt_magic_number_names_the_file(tmp_path):
    data = bytearray(idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    data[3] = 0x01  # claims 1 dimension: a labels header on an images file
    path = write_gz(tmp_path / "train-images-idx3-ubyte.gz", bytes(data))
    with pytest.raises(fm.FashionMnistError, match=r"train-images-idx3-ubyte\.gz: bad IDX magic "
                                                   r"number 0x00000801, expected 0x00000803"):
        fm.read_images(path)


def test_labels_file_given_as_images_is_rejected(tmp_path):
    path = write_gz(tmp_path / "labels.gz", idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(fm.FashionMnistError, match="bad IDX magic"):
        fm.read_images(path)


def test_truncated_payload_is_reported(tmp_path):
    data = idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10]
    path = write_gz(tmp_path / "imgs.gz", data)
    with pytest.raises(fm.FashionMnistError, match=r"imgs\.gz: truncated: 2358 bytes, the header "
                                                   r"\(3, 28, 28\) needs 2368"):
        fm.read_images(path)


def test_trailing_bytes_are_reported(tmp_path):
    path = write_gz(tmp_path / "lbl.gz", idx_bytes(np.zeros(4, np.uint8)) + b"\x00")
    with pytest.raises(fm.FashionMnistError, match="has trailing bytes"):
        fm.read_labels(path)


def test_truncated_gzip_is_reported(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8) % 10))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(fm.FashionMnistError, match=r"cut\.gz: not a complete gzip file"):
        fm.read_labels(path)


def test_not_gzip_is_reported(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(fm.FashionMnistError, match=r"plain\.gz: not a complete gzip file"):
        fm.read_labels(path)


def test_label_out_of_range_is_reported(tmp_path):
    path = write_gz(tmp_path / "l.gz", idx_bytes(np.array([1, 2, 10, 3], np.uint8)))
    with pytest.raises(fm.FashionMnistError, match="label 10 at index 2 is out of range"):
        fm.read_labels(path)


def test_wrong_image_side_is_reported(tmp_path):
    path = write_gz(tmp_path / "i.gz", idx_bytes(np.zeros((2, 32, 32), np.uint8)))
    with pytest.raises(fm.FashionMnistError, match="images are 32x32, expected 28x28"):
        fm.read_images(path)


def test_image_label_count_mismatch_is_reported(tmp_path):
    source = make_source(tmp_path / "fm", n_train=10)
    write_gz(source / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(9, np.uint8)))
    with pytest.raises(fm.FashionMnistError, match="holds 10 images but .* holds 9 labels"):
        fm.load_split(source, "train")


def test_missing_directory_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match=r"directory not found; install it with `apt-get install "
                             r"dataset-fashion-mnist` or point `data.source_dir`"):
        fm.load_split(tmp_path / "nowhere", "train")


def test_missing_file_names_it_and_says_how_to_install(tmp_path):
    source = make_source(tmp_path / "fm")
    (source / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz: Fashion-MNIST file "
                                                r"not found; install it with `apt-get install"):
        fm.load_split(source, "test")


# --- balanced subset ----------------------------------------------------------------------

def test_balanced_subset_zero_means_all():
    labels = np.array([2, 0, 1, 1, 0])
    assert fm.balanced_subset(labels, 0, seed=0).tolist() == [0, 1, 2, 3, 4]


def test_balanced_subset_spreads_remainder_to_lowest_classes():
    labels = np.repeat(np.arange(10), 50)
    np.random.default_rng(0).shuffle(labels)
    indices = fm.balanced_subset(labels, 23, seed=3)
    assert np.bincount(labels[indices], minlength=10).tolist() == [3, 3, 3] + [2] * 7


def test_balanced_subset_is_sorted_unique_and_deterministic():
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    first = fm.balanced_subset(labels, 100, seed=7)
    assert first.tolist() == sorted(set(first.tolist())) and len(first) == 100
    np.testing.assert_array_equal(first, fm.balanced_subset(labels, 100, seed=7))
    assert not np.array_equal(first, fm.balanced_subset(labels, 100, seed=8))


def test_balanced_subset_redistributes_when_a_class_is_small():
    labels = np.array([0] * 2 + [1] * 20 + [2] * 20)
    counts = np.bincount(labels[fm.balanced_subset(labels, 15, seed=0)]).tolist()
    # class 0 gives all it has; the 13 left are split 7/6 (extra one to the lower id)
    assert counts == [2, 7, 6]


def test_balanced_subset_full_size_returns_everything():
    labels = np.array([0, 0, 0, 1])
    assert fm.balanced_subset(labels, 4, seed=1).tolist() == [0, 1, 2, 3]


def test_balanced_subset_rejects_limit_above_size():
    with pytest.raises(ValueError, match="limit 6 exceeds the 5 available samples"):
        fm.balanced_subset(np.zeros(5, int), 6, seed=0)


def test_balanced_subset_rejects_negative_limit():
    with pytest.raises(ValueError, match="limit must be >= 0"):
        fm.balanced_subset(np.zeros(5, int), -1, seed=0)


# --- PNG encoding and records -------------------------------------------------------------

def test_encode_png_round_trips_grayscale_pixels():
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    png = fm.encode_png(image)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.mode == "L" and decoded.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(decoded), image)


def test_encode_png_rejects_colour_arrays():
    with pytest.raises(ValueError, match=r"expected an \(H, W\) uint8 image"):
        fm.encode_png(np.zeros((28, 28, 3), np.uint8))


def test_iter_records_uses_original_indices_in_keys():
    images = np.zeros((200, 28, 28), np.uint8)
    images[123, 0, 0] = 77
    labels = np.arange(200) % 10
    records = list(fm.iter_records(images, labels, np.array([5, 123]), "train"))
    assert [(key, label) for key, label, _ in records] == [("fmnist_train_000005", 5),
                                                           ("fmnist_train_000123", 3)]
    with Image.open(io.BytesIO(records[1][2])) as decoded:
        assert decoded.getpixel((0, 0)) == 77


# --- the stage ----------------------------------------------------------------------------

def test_stage_writes_balanced_tsvs_labelmap_and_metrics(tmp_path):
    source = make_source(tmp_path / "fm", n_train=40, n_test=20)
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source_dir: {source}\n  limit_train: 13\n  limit_val: 0\n"
                      f"  seed: 4\n")
    out, metrics = tmp_path / "data" / "fashion_mnist", tmp_path / "metrics" / "fm.json"
    env = {**os.environ, "SEED_TRACKING": "0"}
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "fashion_mnist.py"),
                           "--params", str(params), "--out", str(out), "--metrics", str(metrics)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "labelmap.txt", "train.lineidx", "train.tsv", "val.lineidx", "val.tsv"]
    assert (out / "labelmap.txt").read_text().splitlines() == list(fm.CLASS_NAMES)

    train_rows = [line.split(b"\t") for line in (out / "train.tsv").read_bytes().splitlines()]
    assert len(train_rows) == 13
    labels = [int(row[1]) for row in train_rows]
    assert np.bincount(labels, minlength=10).tolist() == [2, 2, 2] + [1] * 7
    images, _ = fm.load_split(source, "train")
    for key, label, b64 in train_rows:
        index = int(key.decode().removeprefix("fmnist_train_"))
        assert label == str(index % 10).encode()
        with Image.open(io.BytesIO(base64.b64decode(b64))) as decoded:
            np.testing.assert_array_equal(np.asarray(decoded), images[index])
    val_keys = [line.split(b"\t")[0] for line in (out / "val.tsv").read_bytes().splitlines()]
    assert val_keys == [f"fmnist_test_{i:06d}".encode() for i in range(20)]

    report = json.loads(metrics.read_text())
    assert report["train"]["samples"] == 13 and report["val"]["samples"] == 20
    assert report["val"]["per_class"] == {name: 2 for name in fm.CLASS_NAMES}
    assert report["train"]["per_class"]["Pullover"] == 2
    assert report["train"]["per_class"]["Ankle boot"] == 1


def test_stage_fails_cleanly_without_data(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source_dir: {tmp_path / 'missing'}\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "fashion_mnist.py"),
                           "--params", str(params), "--out", str(out),
                           "--metrics", str(tmp_path / "m.json")],
                          capture_output=True, text=True, env={**os.environ, "SEED_TRACKING": "0"})
    assert proc.returncode == 1
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert list(tmp_path.iterdir()) == [params]  # no output dir, no temp dir, no metrics
