"""Convert a SEED-format TSV (`key<TAB>label<TAB>base64 image`) into WebDataset tar shards.

Built for ImageNet-size inputs. Samples are written in a seeded global permutation of the TSV
(`shuffle_seed`; None keeps the TSV's order), so a class-sorted TSV gives class-mixed shards:
lines are read at their byte offsets (the TSV's `.lineidx`, or one scan of the file without it;
8 bytes per line are held in memory, never the data). The decoding/validation of each record
runs in a pool of worker processes over chunks of lines with a bounded number of chunks in
flight, and a single writer in the main process appends the records to the shards.

Each sample of `shard-NNNNNN.tar` holds, under `__key__ = safe_key(tsv key)`:
- `<ext>`: the original encoded image bytes, unchanged, `ext` detected from the magic bytes;
- `cls`: the integer label as ASCII digits (the webdataset convention);
- `json`: `{"key": original key, "line": 1-based TSV line number}`.

One consolidated index, `index.bin` (`shardset.write_sample_index`), lists every sample's shard,
the byte offset and size of its image member, its label and original key, so loaders read any
sample directly; it is memory-mapped by the readers. The manifest records each shard's and the
index's `bytes` and `sha256`, so a downloaded copy can be verified.

Bad records are skipped and listed in `manifest.json`; more than `max_bad_fraction` of them (or,
with `strict`, any) stop the conversion instead of producing a shrunken dataset. Images are
checked for size from their header before decoding (`data/images.py`), so an image bomb costs
nothing. The output directory appears only when the whole conversion succeeded.
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
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from seed_core.config import DataConfig
from seed_core.data.images import ImageError, verify_image
from seed_core.data.shardset import INDEX_NAME, MANIFEST_NAME, SampleIndex, write_sample_index
from seed_core.data.tsv import TSV_COLUMNS, TsvFormatError, line_offsets, read_line, split_line
from seed_core.io import UserError, atomic_dir, write_json

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE: int = DataConfig.shard_size
DEFAULT_MAX_BAD_FRACTION = 0.01
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


class ShardConversionError(UserError, RuntimeError):
    """A bad record under `strict`, or an unusable input file."""


def safe_key(key: str) -> str:
    """A webdataset-safe `__key__` for `key`: no dots (they split a sample), no slashes.

    Letters, digits, `_` and `-` are kept; every other UTF-8 byte becomes `%XX` (`%` included),
    so the mapping is injective: distinct TSV keys stay distinct.
    """
    if _SAFE_KEY_RE.fullmatch(key):
        return key
    return "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in key.encode("utf-8"))


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
        ext = verify_image(image_bytes)
    except ImageError as err:
        return bad(str(err))
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


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; returns the byte offset of its data in the tar file."""
    # fixed metadata: the same TSV always gives byte-identical shards (stable DVC hashes)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
    padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return tar.offset - padded


def file_digest(path: str | Path) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file, read in 1 MiB blocks (just written: in the page cache)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


class ShardWriter:
    """Appends samples to `shard-NNNNNN.tar` files in `out_dir`, `shard_size` per shard; records
    each finished shard's bytes and sha256, and at `close` writes the consolidated sample index
    (`index.bin`)."""

    def __init__(self, out_dir: str | Path, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._index: dict[str, list] = {}
        # finished shards' columns as compact arrays (keys: fixed-width bytes), not objects
        self._columns: dict[str, list[np.ndarray]] = {c: [] for c in
                                                      ("labels", "offsets", "sizes", "keys")}

    def write(self, key: str, label: int, ext: str, image: bytes, meta: dict[str, Any]) -> None:
        """Add one sample under `__key__ = safe_key(key)`: the image, its label, its metadata."""
        if self._tar is None or self.shards[-1]["samples"] == self.shard_size:
            self._next_shard()
        name = safe_key(key)
        offset = _add_member(self._tar, f"{name}.{ext}", image)
        _add_member(self._tar, f"{name}.cls", str(label).encode("ascii"))
        _add_member(self._tar, f"{name}.json", json.dumps(meta).encode("utf-8"))
        for column, value in (("keys", key), ("labels", label),
                              ("offsets", offset), ("sizes", len(image))):
            self._index[column].append(value)
        self.shards[-1]["samples"] += 1

    def _next_shard(self) -> None:
        self._close_tar()
        name = SHARD_PATTERN.format(len(self.shards))
        self._tar = tarfile.open(self.out_dir / name, "w", format=tarfile.PAX_FORMAT)
        self.shards.append({"name": name, "samples": 0})
        self._index = {column: [] for column in ("keys", "labels", "offsets", "sizes")}

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            shard = self.shards[-1]
            shard["bytes"], shard["sha256"] = file_digest(self.out_dir / shard["name"])
            self._columns["keys"].append(
                np.array([k.encode("utf-8") for k in self._index["keys"]], dtype=bytes))
            for column in ("labels", "offsets", "sizes"):
                self._columns[column].append(np.array(self._index[column], dtype=np.int64))

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns `[{"name", "samples", "bytes", "sha256"}, ...]`."""
        self._close_tar()
        return self.shards

    def write_index(self) -> dict[str, Any]:
        """Write `index.bin` for the shards written so far; returns its manifest entry."""
        counts = [shard["samples"] for shard in self.shards]
        columns = {c: (np.concatenate(parts) if parts else np.zeros(0, np.int64))
                   for c, parts in self._columns.items()}
        if not self._columns["keys"]:
            columns["keys"] = np.zeros(0, dtype="S1")
        index = SampleIndex(shard=np.repeat(np.arange(len(counts), dtype=np.int32), counts),
                            **columns)
        return write_sample_index(self.out_dir / INDEX_NAME, index)


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


def _permuted_lines(tsv_path: Path, offsets: np.ndarray, order: np.ndarray, digest: Any,
                    read: dict[str, int]) -> Iterator[tuple[int, bytes]]:
    """`(1-based line number, line without its ending)` in `order`, read at their offsets.

    Hashes the lines in the order they are written (`records_sha256`: the same TSV and seed
    always give the same digest) and counts the bytes, so a `.lineidx` that misses lines shows.
    """
    where = str(tsv_path)
    with open(tsv_path, "rb") as stream:
        for position, line_index in enumerate(order.tolist()):
            try:
                line = read_line(stream, int(offsets[line_index]), f"{where}:{line_index + 1}")
            except TsvFormatError as err:
                raise ShardConversionError(str(err)) from None
            digest.update(line)
            read["bytes"] += len(line)
            read["lines"] = position + 1
            yield line_index + 1, line.rstrip(b"\r\n")


def check_bad_rows(tsv_path: Path, skipped: list[dict[str, Any]], lines: int,
                   max_bad_fraction: float) -> None:
    """Fail rather than produce a dataset shrunk by more than `max_bad_fraction` of bad rows."""
    if lines and len(skipped) > max_bad_fraction * lines:
        first = skipped[0]
        raise ShardConversionError(
            f"{tsv_path}: {len(skipped)} of {lines} lines are bad ({100 * len(skipped) / lines:.2f}"
            f"%), more than --max-bad-fraction {max_bad_fraction:g}; nothing was written. Fix the "
            f"input (first bad: line {first['line']}: {first['reason']}) or raise the threshold")


def convert_tsv_to_shards(tsv_path: str | Path, out_dir: str | Path,
                          shard_size: int = DEFAULT_SHARD_SIZE, strict: bool = False,
                          workers: int | None = None, labelmap: str | Path | None = None,
                          shuffle_seed: int | None = 0,
                          max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> dict[str, Any]:
    """Convert one SEED TSV into WebDataset shards in `out_dir` (replaced atomically).

    Args:
        tsv_path: the TSV; a `labelmap.txt` beside it is used unless `labelmap` is given.
        out_dir: output directory; it appears only if the conversion succeeds.
        shard_size: samples per shard.
        strict: stop at the first bad record (`ShardConversionError` naming file:line).
        workers: decoding processes; None = every CPU; <= 1 decodes in this process.
        labelmap: class names file; labels must then be < its number of lines.
        shuffle_seed: seed of the global permutation the samples are written in; None keeps
            the TSV's line order.
        max_bad_fraction: fail when more than this fraction of the lines is bad.

    Returns:
        The manifest written to `out_dir/manifest.json`.
    """
    tsv_path = Path(tsv_path)
    if not tsv_path.is_file():
        raise FileNotFoundError(f"{tsv_path}: no such TSV file")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not 0.0 <= max_bad_fraction < 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if labelmap is None and (tsv_path.parent / LABELMAP_NAME).is_file():
        labelmap = tsv_path.parent / LABELMAP_NAME
    class_names = read_labelmap(labelmap) if labelmap is not None else None

    start = time.perf_counter()
    offsets, offsets_from = line_offsets(tsv_path)
    order = (np.arange(len(offsets)) if shuffle_seed is None
             else np.random.default_rng(shuffle_seed).permutation(len(offsets)))
    skipped: list[dict[str, Any]] = []
    extensions: collections.Counter = collections.Counter()
    class_counts: collections.Counter = collections.Counter()
    seen_keys: dict[str, int] = {}
    lines = 0
    digest, read = hashlib.sha256(), {"bytes": 0, "lines": 0}
    with atomic_dir(out_dir) as tmp_dir:
        with contextlib.closing(checked_records(
                _permuted_lines(tsv_path, offsets, order, digest, read), workers,
                len(class_names) if class_names else None)) as results, \
                tqdm(desc=tsv_path.name, unit="rec", unit_scale=True, total=len(offsets),
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
                                f"duplicate key {key!r} (also on line {seen_keys[key]})"))
                    if result[0] == _BAD:
                        _, line, reason = result
                        if strict:
                            raise ShardConversionError(f"{tsv_path}:{line}: {reason}")
                        skipped.append({"line": line, "reason": reason})
                        continue
                    seen_keys[key] = line
                    writer.write(key, label, ext, image_bytes, {"key": key, "line": line})
                    extensions[ext] += 1
                    class_counts[label] += 1
            finally:
                shards = writer.close()
        index_entry = writer.write_index()
        written = sum(shard["samples"] for shard in shards)
        size = tsv_path.stat().st_size
        if read["bytes"] != size:
            raise ShardConversionError(
                f"{tsv_path}: its .lineidx covers {read['bytes']} of the file's {size} bytes "
                f"(a stale index); delete {tsv_path.with_suffix('.lineidx').name} and convert "
                f"again (the TSV is then scanned)")
        if not read["lines"] == lines == written + len(skipped) == len(offsets):
            raise ShardConversionError(
                f"{tsv_path}: internal error: {len(offsets)} lines indexed, {read['lines']} read, "
                f"{lines} checked, but {written} written + {len(skipped)} skipped")
        skipped.sort(key=lambda entry: entry["line"])
        check_bad_rows(tsv_path, skipped, lines, max_bad_fraction)
        num_classes = len(class_names) if class_names else max(class_counts, default=-1) + 1
        manifest: dict[str, Any] = {
            "format": "webdataset",
            "samples": written,
            "lines": lines,
            "skipped": skipped,
            "num_classes": num_classes,
            "class_counts": [class_counts.get(c, 0) for c in range(num_classes)],
            "shards": shards,
            "index": index_entry,
            "shard_size": shard_size,
            "order": ({"shuffled": False} if shuffle_seed is None
                      else {"shuffled": True, "seed": shuffle_seed}),
            "extensions": dict(sorted(extensions.items())),
            "source": {"path": str(tsv_path), "bytes": size, "lines": len(offsets),
                       "offsets_from": offsets_from, "records_sha256": digest.hexdigest()},
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
    log.info("%s -> %s: %d lines, %d samples written in %d shards (%s), %d skipped; %.1f s, "
             "%.0f records/s", tsv_path, out_dir, manifest["lines"], manifest["samples"],
             len(manifest["shards"]), "shuffled" if manifest["order"]["shuffled"] else "TSV order",
             len(manifest["skipped"]), seconds, manifest["lines"] / max(seconds, 1e-9))
