"""SEED TSV writing/reading, line index offsets, and compatibility with SEED's own reader."""

from __future__ import annotations

import base64
import io
import os.path as op

import numpy as np
import pytest
from PIL import Image

from seed_core.data.tsv import (TsvFormatError, line_offsets, lineidx_path, read_line,
                                read_lineidx, scan_line_offsets, split_line, write_tsv)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    gray = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(4)]
    colour = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    return [("fmnist_train_000000", 9, png_bytes(gray[0])),
            ("fmnist_train_000001", 0, png_bytes(gray[1])),
            ("n01440764_10026.JPEG", 0, jpeg_bytes(colour)),
            ("img-3", 7, png_bytes(gray[2])),
            ("img-4", 123, png_bytes(gray[3]))]


def test_lineidx_path_is_where_seed_looks(tmp_path):
    assert lineidx_path(tmp_path / "train.tsv") == tmp_path / "train.lineidx"
    assert lineidx_path("a/b.c/val.tsv") == lineidx_path("a/b.c/val.tsv").with_name(
        "val.lineidx")


def test_write_then_read_round_trip(tmp_path, rows):
    path = tmp_path / "train.tsv"
    assert write_tsv(path, iter(rows)) == len(rows)
    offsets, source = line_offsets(path)
    assert source == "lineidx" and len(offsets) == len(rows)
    with open(path, "rb") as f:
        # random access in any order, not only sequential
        for i in (3, 0, 4, 1, 2):
            key, label, b64 = split_line(read_line(f, int(offsets[i]), "x").rstrip(b"\n"))
            assert (key.decode(), int(label), base64.b64decode(b64)) == rows[i]


def test_lineidx_holds_the_byte_offset_of_every_line(tmp_path, rows):
    path = tmp_path / "train.tsv"
    write_tsv(path, rows)
    data = path.read_bytes()
    naive = [0] + [i + 1 for i, byte in enumerate(data) if byte == ord("\n")][:-1]
    assert (tmp_path / "train.lineidx").read_text() == "".join(f"{o}\n" for o in naive)
    assert read_lineidx(path).tolist() == naive


def test_rows_are_key_label_base64(tmp_path, rows):
    path = tmp_path / "x.tsv"
    write_tsv(path, rows[:1])
    key, label, b64 = path.read_bytes().rstrip(b"\n").split(b"\t")
    assert (key, label) == (b"fmnist_train_000000", b"9")
    assert base64.b64decode(b64) == rows[0][2]


def test_offsets_without_lineidx_come_from_one_scan(tmp_path, rows):
    path = tmp_path / "x.tsv"
    write_tsv(path, rows)
    written = read_lineidx(path)
    (tmp_path / "x.lineidx").unlink()
    offsets, source = line_offsets(path)
    assert source == "scan" and offsets.tolist() == written.tolist()
    assert scan_line_offsets(path, chunk_bytes=7).tolist() == written.tolist()  # chunk seams


def test_scan_handles_crlf_and_missing_final_newline(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_bytes(b"a\t1\tQQ==\r\nb\t2\tQQ==")
    assert scan_line_offsets(path).tolist() == [0, 10]
    with open(path, "rb") as f:
        assert read_line(f, 10, "x") == b"b\t2\tQQ=="


def test_an_implausible_lineidx_is_ignored_for_a_scan(tmp_path, rows):
    path = tmp_path / "x.tsv"
    write_tsv(path, rows)
    (tmp_path / "x.lineidx").write_text("5\n3\n")  # not increasing, does not start at 0
    offsets, source = line_offsets(path)
    assert source == "scan" and len(offsets) == len(rows)


def test_read_line_refuses_an_offset_inside_a_line(tmp_path, rows):
    path = tmp_path / "x.tsv"
    write_tsv(path, rows)
    with open(path, "rb") as f, pytest.raises(TsvFormatError,
                                              match=r"x.tsv:2: offset 3 is not the start"):
        read_line(f, 3, f"{path}:2")


def test_empty_tsv_has_empty_lineidx(tmp_path):
    path = tmp_path / "empty.tsv"
    assert write_tsv(path, []) == 0
    assert path.read_bytes() == b"" and (tmp_path / "empty.lineidx").read_text() == ""
    assert line_offsets(path)[0].tolist() == []


@pytest.mark.parametrize("key, message", [
    ("", "empty key"),
    ("a\tb", "printable ASCII"),
    ("a\nb", "printable ASCII"),
    ("a\rb", "printable ASCII"),
    (" lead", "surrounding whitespace"),
    ("caf\u00e9", "printable ASCII"),
])
def test_writer_rejects_keys_seed_would_misread(tmp_path, key, message):
    with pytest.raises(TsvFormatError, match=message):
        write_tsv(tmp_path / "x.tsv", [(key, 0, b"\x89PNG")])


@pytest.mark.parametrize("label", [-1, "3", 1.0, True])
def test_writer_rejects_bad_labels(tmp_path, label):
    with pytest.raises(TsvFormatError, match="label must be a non-negative int"):
        write_tsv(tmp_path / "x.tsv", [("k", label, b"\x89PNG")])


def test_failed_write_leaves_no_files(tmp_path, rows):
    def failing_rows():
        yield rows[0]
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_tsv(tmp_path / "x.tsv", failing_rows())
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_files(tmp_path, rows):
    path = tmp_path / "x.tsv"
    write_tsv(path, rows[:2])
    before = path.read_bytes(), (tmp_path / "x.lineidx").read_bytes()
    with pytest.raises(TsvFormatError):
        write_tsv(path, [rows[2], ("bad\tkey", 0, b"x")])
    assert (path.read_bytes(), (tmp_path / "x.lineidx").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.lineidx", "x.tsv"]


# --- SEED's own reader --------------------------------------------------------------------

class SeedStyleTsvDataset:
    """An independent re-statement of what SEED's loader does, step by step.

    Mirrors jacobswan1/SEED `tools/tsv_io.py` (class `TSVFile`: lineidx at
    `op.splitext(tsv)[0] + '.lineidx'`, read as `int(line.strip())` per line; the TSV opened in
    text mode `open(tsv, 'r')`; `seek(offset)`, `readline()`, `split('\\t')`, `strip()` of each
    field) and `tools/dataset.py` (class `TSVDataset.__getitem__`: `base64.b64decode(row[-1])`,
    `Image.open(io.BytesIO(...)).convert('RGB')`, `target = int(row[1])`).
    """

    def __init__(self, tsv_file: str) -> None:
        self.tsv_file = tsv_file
        lineidx = op.splitext(tsv_file)[0] + ".lineidx"
        with open(lineidx, "r") as fp:
            self.offsets = [int(line.strip()) for line in fp.readlines()]
        self.fp = open(tsv_file, "r")

    def __len__(self) -> int:
        return len(self.offsets)

    def row(self, index: int) -> list[str]:
        self.fp.seek(self.offsets[index])
        return [s.strip() for s in self.fp.readline().split("\t")]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        row = self.row(index)
        image = Image.open(io.BytesIO(base64.b64decode(row[-1]))).convert("RGB")
        return image, int(row[1])

    def close(self) -> None:
        self.fp.close()


def test_seed_reader_reads_our_files(tmp_path, rows):
    path = tmp_path / "train.tsv"
    write_tsv(path, rows)
    dataset = SeedStyleTsvDataset(str(path))
    try:
        assert len(dataset) == len(rows)
        # SEED reads rows in sampler order: check out of order, as a shuffled loader would
        for index in [4, 0, 2, 3, 1]:
            key, label, image_bytes = rows[index]
            assert dataset.row(index)[0] == key
            image, target = dataset[index]
            assert target == label
            with Image.open(io.BytesIO(image_bytes)) as original:
                expected = np.asarray(original.convert("RGB"))
            np.testing.assert_array_equal(np.asarray(image), expected)
        # grayscale PNGs come back as 3 equal channels holding the original pixels
        image, _ = dataset[0]
        with Image.open(io.BytesIO(rows[0][2])) as original:
            gray = np.asarray(original)
        assert np.asarray(image).shape == (28, 28, 3)
        for channel in range(3):
            np.testing.assert_array_equal(np.asarray(image)[:, :, channel], gray)
    finally:
        dataset.close()


def test_seed_reader_reads_the_fashion_mnist_stage_format(tmp_path):
    from seed_core.data import fashion_mnist as fm

    images = np.random.default_rng(5).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = np.arange(30) % 10
    path = tmp_path / "val.tsv"
    write_tsv(path, fm.iter_records(images, labels, np.arange(30), "test"))
    dataset = SeedStyleTsvDataset(str(path))
    try:
        for index in (29, 0, 17):
            image, target = dataset[index]
            assert dataset.row(index)[0] == f"fmnist_test_{index:06d}"
            assert target == labels[index]
            np.testing.assert_array_equal(np.asarray(image)[:, :, 0], images[index])
    finally:
        dataset.close()
