"""SEED's TSV image format: `key<TAB>label<TAB>base64(encoded image)` per line, plus a
`.lineidx` file beside it holding the byte offset of every line, one decimal number per line.

SEED's reader (`tools/tsv_io.py`, `tools/dataset.py` in jacobswan1/SEED) finds the index at
`os.path.splitext(tsv)[0] + '.lineidx'`, opens the TSV in *text* mode, seeks to the offset,
reads one line, splits it on tabs and strips every field; the label is `int(row[1])` and the
image the base64 of the last column. The writer therefore only emits keys that survive that
path unchanged: ASCII, printable, no tab, no surrounding whitespace.
"""

from __future__ import annotations

import base64
import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from seed_core.io import atomic_path

TSV_COLUMNS = 3  # key, label, base64 image


class TsvFormatError(ValueError):
    """A TSV row or its line index does not follow SEED's format."""


def lineidx_path(tsv_path: str | Path) -> Path:
    """Where SEED looks for the line index of `tsv_path`."""
    return Path(os.path.splitext(str(tsv_path))[0] + ".lineidx")


def check_key(key: str) -> None:
    """Raise `TsvFormatError` unless `key` reads back unchanged through SEED's text-mode reader."""
    if not key:
        raise TsvFormatError("empty key")
    if not (key.isascii() and key.isprintable()) or key != key.strip():
        raise TsvFormatError(f"key {key!r} must be printable ASCII without tabs or surrounding "
                             f"whitespace (SEED reads the TSV as text and strips every field)")


def format_row(key: str, label: int, image_bytes: bytes) -> bytes:
    """One TSV line (with its trailing newline) for an encoded image."""
    check_key(key)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
        raise TsvFormatError(f"key {key!r}: label must be a non-negative int, got {label!r}")
    if not image_bytes:
        raise TsvFormatError(f"key {key!r}: empty image bytes")
    return b"%s\t%d\t%s\n" % (key.encode("ascii"), int(label), base64.b64encode(image_bytes))


def write_tsv(tsv_path: str | Path, rows: Iterable[tuple[str, int, bytes]]) -> int:
    """Stream `(key, label, encoded image bytes)` rows into `tsv_path` and its `.lineidx`.

    Both files are written to temporary siblings and renamed only once every row is written.

    Returns:
        The number of rows written.
    """
    tsv_path = Path(tsv_path)
    count = 0
    with atomic_path(tsv_path) as tmp_tsv, atomic_path(lineidx_path(tsv_path)) as tmp_idx:
        with open(tmp_tsv, "wb") as tsv, open(tmp_idx, "w", encoding="ascii") as idx:
            offset = 0
            for key, label, image_bytes in rows:
                line = format_row(key, label, image_bytes)
                idx.write(f"{offset}\n")
                tsv.write(line)
                offset += len(line)
                count += 1
    return count


def split_line(line: bytes) -> list[bytes]:
    """Fields of one raw TSV line (newline already removed), each stripped as SEED strips them."""
    return [field.strip() for field in line.split(b"\t")]


def iter_lines(tsv_path: str | Path, stream: BinaryIO | None = None) -> Iterator[tuple[int, bytes]]:
    """Stream `(line_number, raw line)` pairs; numbers are 1-based, the line ending is removed.

    Args:
        tsv_path: the TSV file (used for opening and in messages).
        stream: an already open binary stream to read instead of opening `tsv_path`.
    """
    with contextlib.ExitStack() as stack:
        f = stream if stream is not None else stack.enter_context(open(tsv_path, "rb"))
        for number, line in enumerate(f, start=1):
            yield number, line.rstrip(b"\r\n")


def iter_rows(tsv_path: str | Path) -> Iterator[tuple[int, list[bytes]]]:
    """Stream `(line_number, raw fields)` without loading the file; fields are stripped bytes."""
    for number, line in iter_lines(tsv_path):
        yield number, split_line(line)


def parse_row(fields: list[bytes], where: str = "") -> tuple[str, int, bytes]:
    """`(key, label, encoded image bytes)` of one row's fields (SEED: label = column 2, image =
    last column)."""
    prefix = f"{where}: " if where else ""
    if len(fields) != TSV_COLUMNS:
        raise TsvFormatError(f"{prefix}expected {TSV_COLUMNS} tab-separated columns (key, label, "
                             f"base64 image), got {len(fields)}")
    try:
        label = int(fields[1])
        image_bytes = base64.b64decode(fields[-1], validate=True)
    except ValueError as err:  # binascii.Error is a ValueError
        raise TsvFormatError(f"{prefix}{err}") from None
    return fields[0].decode("utf-8", errors="replace"), label, image_bytes


def read_lineidx(tsv_path: str | Path) -> np.ndarray:
    """Byte offsets `(N,)` int64 of every line of `tsv_path`, from its `.lineidx`."""
    path = lineidx_path(tsv_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no line index beside {tsv_path}; rebuild it with "
                                f"seed_core.tsv.build_lineidx({str(tsv_path)!r})")
    try:
        return np.array(path.read_text(encoding="ascii").split(), dtype=np.int64)
    except (ValueError, UnicodeDecodeError) as err:
        raise TsvFormatError(f"{path}: not one integer offset per line ({err})") from None


def build_lineidx(tsv_path: str | Path) -> int:
    """(Re)write the `.lineidx` of an existing TSV by scanning it; returns the line count."""
    count = 0
    with atomic_path(lineidx_path(tsv_path)) as tmp, open(tmp, "w", encoding="ascii") as idx:
        offset = 0
        with open(tsv_path, "rb") as tsv:
            for line in tsv:
                idx.write(f"{offset}\n")
                offset += len(line)
                count += 1
    return count


class TsvReader:
    """Random access to the rows of a SEED TSV through its `.lineidx`.

    Use as a context manager (or call `close()`); `len(reader)` is the number of rows.
    """

    def __init__(self, tsv_path: str | Path) -> None:
        self.path = Path(tsv_path)
        self.offsets = read_lineidx(self.path)
        self._file: BinaryIO = open(self.path, "rb")

    def __len__(self) -> int:
        return len(self.offsets)

    def fields(self, index: int) -> list[bytes]:
        """Raw stripped fields of row `index` (0-based)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.path}: row {index} out of range ({len(self)} rows)")
        self._file.seek(int(self.offsets[index]))
        return split_line(self._file.readline().rstrip(b"\r\n"))

    def __getitem__(self, index: int) -> tuple[str, int, bytes]:
        """`(key, label, encoded image bytes)` of row `index`."""
        row = index if index >= 0 else index + len(self)
        return parse_row(self.fields(index), f"{self.path}: row {row}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TsvReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
