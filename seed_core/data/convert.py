"""Convert a SEED-format TSV (`key<TAB>label<TAB>base64 image`) into WebDataset tar shards.

Built for ImageNet-size inputs: the TSV is streamed line by line (never loaded whole), the
decoding/validation of each record runs in a pool of worker processes over chunks of lines with
a bounded number of chunks in flight (so memory stays flat however large the file), and a single
writer in the main process appends the records to the shards in TSV line order.

Each sample of `shard-NNNNNN.tar` holds, under `__key__ = safe_key(tsv key)`:
- `<ext>`: the original encoded image bytes, unchanged, `ext` detected from the magic bytes;
- `cls`: the integer label as ASCII digits (the webdataset convention);
- `json`: `{"key": original key, "line": 1-based TSV line number}`.

Bad records are skipped and listed in `manifest.json` (or, with `strict`, stop the conversion);
the output directory appears only when the whole conversion succeeded.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import signal
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from PIL import Image
from tqdm import tqdm

from seed_core.config import DataConfig
from seed_core.data.tsv import TSV_COLUMNS, split_line
from seed_core.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE: int = DataConfig.shard_size
MANIFEST_NAME = "manifest.json"
LABELMAP_NAME = "labelmap.txt"
SHARD_PATTERN = "shard-{:06d}.tar"
CHUNK_LINES = 64  # lines per worker task: large enough to amortise IPC, small for flat memory
CHUNKS_IN_FLIGHT_PER_WORKER = 4
MAX_REASON_CHARS = 200

_OK, _BAD = 0, 1
_SAFE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS_RE = re.compile(rb"[0-9]+")
_NEGATIVE_RE = re.compile(rb"-[0-9]+")


class ShardConversionError(RuntimeError):
    """A bad record under `strict`, or an unusable input file."""


def safe_key(key: str) -> str:
    """A webdataset-safe `__key__` for `key`: no dots (they split a sample), no slashes.

    Letters, digits, `_` and `-` are kept; every other UTF-8 byte becomes `%XX` (`%` included),
    so the mapping is injective: distinct TSV keys stay distinct.
    """
    if _SAFE_KEY_RE.fullmatch(key):
        return key
    return "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in key.encode("utf-8"))


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


def _pil_extension(pil_format: str) -> str:
    Image.init()
    for ext, fmt in sorted(Image.EXTENSION.items()):
        if fmt == pil_format:
            return ext.lstrip(".")
    return pil_format.lower()


def decode_image(data: bytes) -> str:
    """Fully decode `data` with PIL (a header check misses truncated pixel data); returns the
    extension under which the bytes are stored. Raises whatever PIL raises on bad data."""
    with Image.open(io.BytesIO(data)) as image:
        pil_format = image.format or ""
        image.load()
    return image_extension(data) or _pil_extension(pil_format)


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."


def check_line(line_number: int, line: bytes,
               num_classes: int | None = None) -> tuple[Any, ...]:
    """Validate one raw TSV line (line ending removed).

    Returns:
        `(_OK, line_number, key, label, ext, image_bytes)` or `(_BAD, line_number, reason)`.
    """
    def bad(reason: str) -> tuple[Any, ...]:
        return _BAD, line_number, _shorten(reason)

    if not line.strip():
        return bad("blank line")
    fields = split_line(line)
    if len(fields) != TSV_COLUMNS:
        return bad(f"expected {TSV_COLUMNS} tab-separated columns (key, label, base64 image), "
                   f"got {len(fields)}")
    raw_key, raw_label, raw_image = fields
    if not raw_key:
        return bad("empty key")
    try:
        key = raw_key.decode("utf-8")
    except UnicodeDecodeError:
        return bad(f"key {raw_key[:60]!r} is not valid UTF-8")
    if _NEGATIVE_RE.fullmatch(raw_label):
        return bad(f"negative label {raw_label.decode()}")
    if not _DIGITS_RE.fullmatch(raw_label):
        return bad(f"non-integer label {raw_label[:40].decode('utf-8', 'replace')!r}")
    label = int(raw_label)
    if num_classes is not None and label >= num_classes:
        return bad(f"label {label} out of range for the labelmap's {num_classes} classes")
    try:
        image_bytes = base64.b64decode(raw_image, validate=True)
    except binascii.Error as err:
        return bad(f"invalid base64 ({err})")
    if not image_bytes:
        return bad("empty image")
    try:
        ext = decode_image(image_bytes)
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return bad(f"not a decodable image ({type(err).__name__}: {err})")
    return _OK, line_number, key, label, ext, image_bytes


def check_chunk(chunk: list[tuple[int, bytes]],
                num_classes: int | None = None) -> list[tuple[Any, ...]]:
    """`check_line` over a chunk of `(line_number, line)`; runs in a worker process."""
    return [check_line(number, line, num_classes) for number, line in chunk]


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: the main process cleans up and terminates the
    # pool, so workers must not print their own KeyboardInterrupt tracebacks
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _chunked(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def checked_records(numbered_lines: Iterable[tuple[int, bytes]], workers: int,
                    num_classes: int | None = None,
                    chunk_lines: int = CHUNK_LINES) -> Iterator[tuple[Any, ...]]:
    """`check_line` results for every line, in input order.

    With `workers > 1` the checks run in a process pool, chunks of lines submitted in order; at
    most `workers * CHUNKS_IN_FLIGHT_PER_WORKER` chunks are read ahead (`Pool.imap` would read
    the whole input ahead of the workers). Close the generator to stop the pool early.
    """
    check = functools.partial(check_chunk, num_classes=num_classes)
    chunks = _chunked(numbered_lines, chunk_lines)
    if workers <= 1:
        for chunk in chunks:
            yield from check(chunk)
        return
    # ProcessPoolExecutor, not multiprocessing.Pool: Pool.terminate() can deadlock while a
    # worker is writing a large result (seen here on an interrupted conversion); the executor's
    # manager thread keeps draining results, and shutdown waits at most for the running chunks
    executor = ProcessPoolExecutor(workers, initializer=_ignore_sigint)
    try:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(executor.submit(check, chunk))
            if len(pending) >= workers * CHUNKS_IN_FLIGHT_PER_WORKER:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata: the same TSV always gives byte-identical shards (stable DVC hashes)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Appends samples to `shard-NNNNNN.tar` files in `out_dir`, `shard_size` per shard."""

    def __init__(self, out_dir: str | Path, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: `members` maps extension -> bytes, stored as `<key>.<ext>`."""
        if self._tar is None or self.shards[-1]["samples"] == self.shard_size:
            self._next_shard()
        for ext, data in members.items():
            _add_member(self._tar, f"{key}.{ext}", data)
        self.shards[-1]["samples"] += 1

    def _next_shard(self) -> None:
        self._close_tar()
        name = SHARD_PATTERN.format(len(self.shards))
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.PAX_FORMAT)
        self.shards.append({"name": name, "samples": 0})

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns `[{"name": ..., "samples": n}, ...]`."""
        self._close_tar()
        return self.shards


def read_labelmap(path: str | Path) -> list[str]:
    """Class names, one per line (line i = label i)."""
    path = Path(path)
    names = path.read_text(encoding="utf-8").splitlines()
    for number, name in enumerate(names, start=1):
        if not name.strip():
            raise ShardConversionError(f"{path}:{number}: blank class name in the labelmap")
    if not names:
        raise ShardConversionError(f"{path}: empty labelmap")
    return names


def _hashed_lines(stream: BinaryIO, digest: Any,
                  counts: dict[str, int]) -> Iterator[tuple[int, bytes]]:
    # hash while streaming: one pass over an ImageNet-size file instead of two
    for number, line in enumerate(stream, start=1):
        digest.update(line)
        counts["bytes"] += len(line)
        counts["lines"] = number
        yield number, line.rstrip(b"\r\n")


def convert_tsv_to_shards(tsv_path: str | Path, out_dir: str | Path,
                          shard_size: int = DEFAULT_SHARD_SIZE, strict: bool = False,
                          workers: int | None = None,
                          labelmap: str | Path | None = None) -> dict[str, Any]:
    """Convert one SEED TSV into WebDataset shards in `out_dir` (replaced atomically).

    Args:
        tsv_path: the TSV; a `labelmap.txt` beside it is used unless `labelmap` is given.
        out_dir: output directory; it appears only if the conversion succeeds.
        shard_size: samples per shard.
        strict: stop at the first bad record (`ShardConversionError` naming file:line).
        workers: decoding processes; None = every CPU; <= 1 decodes in this process.
        labelmap: class names file; labels must then be < its number of lines.

    Returns:
        The manifest written to `out_dir/manifest.json`.
    """
    tsv_path = Path(tsv_path)
    if not tsv_path.is_file():
        raise FileNotFoundError(f"{tsv_path}: no such TSV file")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if labelmap is None and (tsv_path.parent / LABELMAP_NAME).is_file():
        labelmap = tsv_path.parent / LABELMAP_NAME
    class_names = read_labelmap(labelmap) if labelmap is not None else None

    skipped: list[dict[str, Any]] = []
    extensions: collections.Counter = collections.Counter()
    seen_keys: dict[str, int] = {}
    max_label = -1
    lines = 0
    digest, read = hashlib.sha256(), {"bytes": 0, "lines": 0}
    start = time.perf_counter()
    with atomic_dir(out_dir) as tmp_dir:
        with open(tsv_path, "rb") as stream, \
                contextlib.closing(checked_records(
                    _hashed_lines(stream, digest, read), workers,
                    len(class_names) if class_names else None)) as results, \
                tqdm(desc=tsv_path.name, unit="rec", unit_scale=True,
                     disable=not sys.stderr.isatty()) as bar:
            writer = ShardWriter(tmp_dir, shard_size)
            try:
                for result in results:
                    lines += 1
                    bar.update(1)
                    if result[0] == _OK:
                        _, line, key, label, ext, image_bytes = result
                        if key in seen_keys:
                            result = (_BAD, line, _shorten(
                                f"duplicate key {key!r} (first on line {seen_keys[key]})"))
                    if result[0] == _BAD:
                        _, line, reason = result
                        if strict:
                            raise ShardConversionError(f"{tsv_path}:{line}: {reason}")
                        skipped.append({"line": line, "reason": reason})
                        continue
                    seen_keys[key] = line
                    writer.write(safe_key(key), {
                        ext: image_bytes,
                        "cls": str(label).encode("ascii"),
                        "json": json.dumps({"key": key, "line": line}).encode("utf-8"),
                    })
                    extensions[ext] += 1
                    max_label = max(max_label, label)
            finally:
                shards = writer.close()
        written = sum(shard["samples"] for shard in shards)
        if not read["lines"] == lines == written + len(skipped):
            raise ShardConversionError(
                f"{tsv_path}: internal error: {read['lines']} lines read, {lines} checked, "
                f"but {written} written + {len(skipped)} skipped")
        manifest: dict[str, Any] = {
            "format": "webdataset",
            "samples": written,
            "lines": lines,
            "skipped": skipped,
            "num_classes": len(class_names) if class_names else max_label + 1,
            "shards": shards,
            "shard_size": shard_size,
            "extensions": dict(sorted(extensions.items())),
            "source": {"path": str(tsv_path), "bytes": read["bytes"],
                       "sha256": digest.hexdigest()},
        }
        if class_names:
            manifest["class_names"] = class_names
        write_json(Path(tmp_dir) / MANIFEST_NAME, manifest)
    seconds = time.perf_counter() - start
    _log_summary(tsv_path, out_dir, manifest, seconds)
    return manifest


def _log_summary(tsv_path: Path, out_dir: str | Path, manifest: dict[str, Any],
                 seconds: float) -> None:
    for entry in manifest["skipped"][:20]:
        log.warning("%s:%d: skipped: %s", tsv_path, entry["line"], entry["reason"])
    if len(manifest["skipped"]) > 20:
        log.warning("... %d more skipped lines listed in %s", len(manifest["skipped"]) - 20,
                    Path(out_dir) / MANIFEST_NAME)
    if manifest["samples"] == 0:
        log.warning("%s: no valid record: the shards directory is empty", tsv_path)
    log.info("%s -> %s: %d lines, %d samples written in %d shards, %d skipped; %.1f s, "
             "%.0f records/s", tsv_path, out_dir, manifest["lines"], manifest["samples"],
             len(manifest["shards"]), len(manifest["skipped"]), seconds,
             manifest["lines"] / max(seconds, 1e-9))


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Read `shard_dir/manifest.json` and check that every listed shard exists."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest; convert the TSV first "
                                f"(python stages/shards.py --tsv FILE --out {shard_dir})")
    manifest = read_json(path)
    missing_keys = {"samples", "skipped", "num_classes", "shards", "source"} - set(manifest)
    if missing_keys:
        raise ShardConversionError(f"{path}: manifest lacks {sorted(missing_keys)}")
    missing = [s["name"] for s in manifest["shards"] if not (shard_dir / s["name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{shard_dir}: shards listed in the manifest are missing: "
                                f"{', '.join(missing[:5])}")
    return manifest


def shard_paths(shard_dir: str | Path) -> list[str]:
    """The shard files of a converted directory, in sample order (for `wds.WebDataset`)."""
    shard_dir = Path(shard_dir)
    return [str(shard_dir / s["name"]) for s in load_manifest(shard_dir)["shards"]]
