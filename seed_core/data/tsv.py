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
import os
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from seed_core.io import UserError, atomic_path

TSV_COLUMNS = 3  # key, label, base64 image


class TsvFormatError(UserError, ValueError):
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


def read_lineidx(tsv_path: str | Path) -> np.ndarray:
    """Byte offsets `(N,)` int64 of every line of `tsv_path`, from its `.lineidx`."""
    path = lineidx_path(tsv_path)
    try:
        return np.array(path.read_text(encoding="ascii").split(), dtype=np.int64)
    except (ValueError, UnicodeDecodeError) as err:
        raise TsvFormatError(f"{path}: not one integer offset per line ({err})") from None


def scan_line_offsets(tsv_path: str | Path, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """Byte offsets `(N,)` int64 of every line, found by reading the file once (no index)."""
    starts = [np.zeros(1, dtype=np.int64)]
    position = 0
    with open(tsv_path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            starts.append(newlines.astype(np.int64) + position + 1)
            position += len(chunk)
    offsets = np.concatenate(starts)
    return offsets[offsets < position]  # a line starts after every newline but the last


def line_offsets(tsv_path: str | Path) -> tuple[np.ndarray, str]:
    """Byte offsets of every line and where they came from ("lineidx" or "scan").

    The `.lineidx` is used when it exists and is plausible (starts at 0, strictly increasing,
    inside the file); the reader still checks every line against it (`read_line`). Without one,
    or with an implausible one, the TSV is scanned once.
    """
    size = os.path.getsize(tsv_path)
    if lineidx_path(tsv_path).is_file():
        offsets = read_lineidx(tsv_path)
        plausible = (offsets.size == 0 and size == 0) or (
            offsets.size > 0 and offsets[0] == 0 and bool(np.all(np.diff(offsets) > 0))
            and int(offsets[-1]) < size)
        if plausible:
            return offsets, "lineidx"
    return scan_line_offsets(tsv_path), "scan"


def read_line(stream: BinaryIO, offset: int, where: str) -> bytes:
    """The whole raw line that starts at `offset` (with its line ending).

    Raises `TsvFormatError` when `offset` is not the start of a line (a stale `.lineidx`): the byte
    before it must be a newline.
    """
    if offset > 0:
        stream.seek(offset - 1)
        if stream.read(1) != b"\n":
            raise TsvFormatError(f"{where}: offset {offset} is not the start of a line; the "
                                 f".lineidx does not match the TSV: delete it (the converter then "
                                 f"scans the file) or rewrite it")
    else:
        stream.seek(0)
    return stream.readline()
