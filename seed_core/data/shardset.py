"""A set of WebDataset tar shards described by its `manifest.json`, local or remote, with random
access to every sample.

Where the shards live (`open_shards(location)`):
- a local directory;
- `http://…/` or `https://…/`: a URL prefix, read with the standard library;
- `pipe:COMMAND`: webdataset's convention; `{name}` in COMMAND is replaced by the file wanted
  (`manifest.json`, `shard-000000.tar`...), e.g. `pipe:aws s3 cp s3://bucket/shards/{name} -`;
- any other `scheme://…` that fsspec reads (`s3://`, `gs://`, `file://`... when the matching
  fsspec backend is installed).
Remote shards are copied once into a local cache (`$SEED_SHARD_CACHE`, default
`~/.cache/seed-distill/shards`), under the manifest's hash, by `seed_core.data.fetch`: streamed
to a `.part` file, retried and resumed, checked against the manifest's `bytes` and `sha256`
before an atomic rename, under a file lock so concurrent loader workers download each shard once;
the cache can be capped (LRU eviction). Samples are then read at their byte offsets. A shard
that cannot be fetched intact is a `ShardError` naming it and its URL, never a per-sample read
error whose samples a loader would replace.

The sample index (shard, byte offset and size of the image member, label and key, per sample)
is one file per shard set, `index.bin` (`write_sample_index`): fetched once, verified, and
memory-mapped, so every process of a node shares its pages. Shard sets of older converters,
with one `shard-NNNNNN.tar.idx.json` sidecar per shard, still open; shards from elsewhere are
scanned once. Tar members with absolute or `..` paths, links or devices, and members larger than
`MAX_MEMBER_BYTES` are refused with an error naming the shard and the member.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from seed_core.data import fetch
from seed_core.data.fetch import FetchError, cache_root, clean_stale_parts, download
from seed_core.io import UserError, atomic_path

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.bin"  # the consolidated sample index of a shard set
INDEX_MAGIC = b"SEEDIDX\x00"
INDEX_SUFFIX = ".idx.json"  # per-shard sidecars of older converters
INDEX_FORMAT = "seed-distill-shard-index"
_INDEX_ALIGN = 64
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm")
# one encoded image; ImageNet's largest JPEG is ~15 MB
MAX_MEMBER_BYTES = 64 << 20
_CREATE_SHARDS = "create the shards with `python stages/shards.py --tsv FILE --out DIR`"


class ShardError(UserError, ValueError):
    """A manifest, index or shard is missing, inconsistent or unsafe."""


class UnverifiedWarning(UserWarning):
    """A remote manifest without sizes and hashes: downloads cannot be verified."""


class SampleReadError(OSError):
    """One sample's bytes could not be read (truncated or unreadable shard)."""


# ----------------------------------------------------------------------------- locations


def is_remote(location: str) -> bool:
    return location.startswith("pipe:") or "://" in location


_file_lock = fetch.file_lock


def fetch_bytes(location: str, name: str, check=None) -> bytes:
    """The bytes of a small file `name` under a remote `location` (http(s), pipe: or fsspec),
    fetched with the retries of `seed_core.data.fetch` and verified by `check` (see there)."""
    try:
        return fetch.fetch_bytes(location, name, check=check)
    except FetchError as err:
        raise ShardError(str(err)) from None


def cached_copy(location: str, name: str, cache_dir: Path, size: int | None = None,
                sha256: str | None = None) -> Path:
    """The local copy of remote file `name`, downloaded once per node and verified against
    `size` and `sha256` when the manifest has them (`seed_core.data.fetch.download`)."""
    try:
        return download(location, name, cache_dir / name, size=size, sha256=sha256)
    except FetchError as err:
        # a shard that cannot be fetched intact stops the run: the loader replaces unreadable
        # samples, and silently replacing a whole shard's would shrink the dataset
        raise ShardError(f"{name}: not fetched intact; {err}") from None


# ----------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class ShardIndex:
    """Every sample of one shard: original key, label, and where its image bytes lie."""

    keys: tuple[str, ...]
    labels: np.ndarray  # (n,) int64
    offsets: np.ndarray  # (n,) int64, byte offset of the image member's data in the tar
    sizes: np.ndarray  # (n,) int64

    def to_json(self, exts: list[str]) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "version": 1, "keys": list(self.keys),
                "labels": self.labels.tolist(), "exts": exts,
                "offsets": self.offsets.tolist(), "sizes": self.sizes.tolist()}


def index_from_json(data: dict[str, Any], where: str) -> ShardIndex:
    if data.get("format") != INDEX_FORMAT:
        raise ShardError(f"{where}: not a shard index (format {data.get('format')!r})")
    try:
        keys = tuple(str(k) for k in data["keys"])
        arrays = [np.asarray(data[name], dtype=np.int64) for name in ("labels", "offsets", "sizes")]
    except (KeyError, TypeError, ValueError) as err:
        raise ShardError(f"{where}: malformed shard index ({err})") from None
    if not all(a.shape == (len(keys),) for a in arrays):
        raise ShardError(f"{where}: keys, labels, offsets and sizes differ in length")
    return ShardIndex(keys, *arrays)


def _check_member(member: tarfile.TarInfo, shard: str, max_bytes: int) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise ShardError(f"{shard}: member {member.name!r} has an absolute or '..' path; the "
                         f"shard is unsafe and was refused")
    if not member.isfile():
        raise ShardError(f"{shard}: member {member.name!r} is not a regular file (a link or a "
                         f"device); the shard is unsafe and was refused")
    if member.size > max_bytes:
        raise ShardError(f"{shard}: member {member.name!r} is {member.size:,} bytes, more than "
                         f"the {max_bytes:,} allowed for one sample; the shard was refused")


def sample_key_of(member_name: str) -> tuple[str, str]:
    """webdataset's split of a member name: (key, extension) at the first dot of the basename."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def scan_shard(path: str | Path, max_member_bytes: int = MAX_MEMBER_BYTES) -> ShardIndex:
    """The index of a tar shard without a sidecar, read from its member headers.

    Labels come from the `cls` member; the original key from the `json` member's "key" when
    present, else from the member names.
    """
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                _check_member(member, str(path), max_member_bytes)
                key, ext = sample_key_of(member.name)
                entry = samples.setdefault(key, {"key": key})
                if ext == "cls":
                    entry["label"] = int(tar.extractfile(member).read().strip())
                elif ext == "json":
                    entry["key"] = json.loads(tar.extractfile(member).read()).get("key", key)
                elif ext in IMAGE_EXTENSIONS and "offset" not in entry:
                    entry["offset"], entry["size"] = member.offset_data, member.size
    except (tarfile.TarError, OSError, ValueError) as err:
        raise ShardError(f"{path}: unreadable shard ({err})") from None
    incomplete = [k for k, e in samples.items() if "label" not in e or "offset" not in e]
    if incomplete:
        raise ShardError(f"{path}: samples without an image or a cls label: {incomplete[:3]}")
    rows = list(samples.values())
    return ShardIndex(tuple(r["key"] for r in rows),
                      np.array([r["label"] for r in rows], dtype=np.int64),
                      np.array([r["offset"] for r in rows], dtype=np.int64),
                      np.array([r["size"] for r in rows], dtype=np.int64))


# ----------------------------------------------------------------------------- the shard set


REQUIRED_MANIFEST = {"samples": int, "num_classes": int, "shards": list, "skipped": list}


def check_manifest(manifest: Any, where: str) -> None:
    """The manifest's shape and its internal consistency (counts add up, classes named)."""
    if not isinstance(manifest, dict):
        raise ShardError(f"{where}: not a JSON object")
    for key, kind in REQUIRED_MANIFEST.items():
        if not isinstance(manifest.get(key), kind):
            raise ShardError(f"{where}: '{key}' is missing or not a {kind.__name__}; "
                             f"{_CREATE_SHARDS}")
    shards = manifest["shards"]
    if not shards or manifest["samples"] < 1:
        raise ShardError(f"{where}: no samples (every record was skipped, or an empty TSV); "
                         f"{_CREATE_SHARDS} from a TSV with valid rows")
    for i, shard in enumerate(shards):
        if not (isinstance(shard, dict) and isinstance(shard.get("name"), str)
                and isinstance(shard.get("samples"), int) and shard["samples"] >= 0):
            raise ShardError(f"{where}: shards[{i}] needs a 'name' and a 'samples' count")
        name = PurePosixPath(shard["name"])
        if name.is_absolute() or len(name.parts) != 1:
            raise ShardError(f"{where}: shards[{i}] name {shard['name']!r} must be a plain "
                             f"file name")
        _check_file_entry(shard, f"{where}: shards[{i}]")
    index = manifest.get("index")
    if index is not None:
        if not (isinstance(index, dict) and isinstance(index.get("name"), str)
                and len(PurePosixPath(index["name"]).parts) == 1
                and not PurePosixPath(index["name"]).is_absolute()):
            raise ShardError(f"{where}: 'index' needs a plain file 'name'")
        _check_file_entry(index, f"{where}: index")
    total = sum(s["samples"] for s in shards)
    if total != manifest["samples"]:
        raise ShardError(f"{where}: the shards hold {total} samples, 'samples' says "
                         f"{manifest['samples']}")
    if manifest["num_classes"] < 1:
        raise ShardError(f"{where}: 'num_classes' must be >= 1")
    names = manifest.get("class_names")
    if names is not None and len(names) != manifest["num_classes"]:
        raise ShardError(f"{where}: {len(names)} class_names for num_classes "
                         f"{manifest['num_classes']}")


def _check_file_entry(entry: dict[str, Any], where: str) -> None:
    size, digest = entry.get("bytes"), entry.get("sha256")
    if size is not None and not (isinstance(size, int) and size >= 0):
        raise ShardError(f"{where}: 'bytes' must be an integer >= 0, not {size!r}")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                   and all(c in "0123456789abcdef" for c in digest)):
        raise ShardError(f"{where}: 'sha256' must be 64 lowercase hex digits, not {digest!r}")


def unverifiable_files(manifest: dict[str, Any]) -> list[str]:
    """The manifest's files without a size and sha256 (written by an older converter)."""
    entries = list(manifest["shards"]) + ([manifest["index"]] if "index" in manifest else [])
    return [e["name"] for e in entries if e.get("bytes") is None or e.get("sha256") is None]


@dataclass(frozen=True)
class SampleIndex:
    """Every sample of a shard set, in global order (shard by shard)."""

    shard: np.ndarray  # (N,) int32
    offsets: np.ndarray  # (N,) int64
    sizes: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64
    keys: np.ndarray  # (N,) fixed-width UTF-8 bytes: no per-key objects, so forked loader
    # workers share the pages instead of copying them on every refcount change

    def key(self, i: int) -> str:
        return self.keys[i].decode("utf-8")


_INDEX_COLUMNS = {"shard": "<i4", "offsets": "<i8", "sizes": "<i8", "labels": "<i8",
                  "keys": None}


def _aligned(n: int) -> int:
    return -(-n // _INDEX_ALIGN) * _INDEX_ALIGN


def write_sample_index(path: str | Path, index: SampleIndex) -> dict[str, Any]:
    """Write `index` as one flat file (atomically) that `load_sample_index` memory-maps.

    Layout: `INDEX_MAGIC`, the header's length (uint64, little-endian), a JSON header (format,
    samples, each column's dtype, shape and offset), then each column's little-endian array at
    a 64-byte-aligned offset. Returns the manifest's entry: `{"name", "bytes", "sha256"}`.
    """
    path = Path(path)
    arrays = {}
    for column, dtype in _INDEX_COLUMNS.items():
        array = np.asarray(getattr(index, column))
        if column == "keys":
            dtype = f"S{max(1, array.dtype.itemsize)}"  # S0 cannot be memory-mapped
        arrays[column] = np.ascontiguousarray(array, dtype=dtype)
    layout, position = {}, 0
    for column, array in arrays.items():
        layout[column] = {"dtype": array.dtype.str, "shape": list(array.shape),
                          "offset": position}
        position = _aligned(position + array.nbytes)
    header = json.dumps({"format": INDEX_FORMAT, "version": 2,
                         "samples": int(arrays["shard"].shape[0]), "columns": layout}).encode()
    prefix = INDEX_MAGIC + len(header).to_bytes(8, "little") + header
    digest, written = hashlib.sha256(), 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        def put(data: bytes) -> None:
            nonlocal written
            f.write(data)
            digest.update(data)
            written += len(data)

        put(prefix + b"\0" * (_aligned(len(prefix)) - len(prefix)))
        start = written
        for column, array in arrays.items():
            put(b"\0" * (start + layout[column]["offset"] - written))
            put(array.tobytes())
    return {"name": path.name, "bytes": written, "sha256": digest.hexdigest()}


def load_sample_index(path: str | Path) -> SampleIndex:
    """The index written by `write_sample_index`, memory-mapped read-only: the processes of a
    node share its pages (the page cache), and forked workers copy nothing."""
    path = Path(path)
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        if raw.size < 16 or raw[:8].tobytes() != INDEX_MAGIC:
            raise ShardError(f"{path}: not a sample index (no {INDEX_MAGIC!r} magic)")
        length = int.from_bytes(raw[8:16].tobytes(), "little")
        header = json.loads(raw[16:16 + length].tobytes())
        if header.get("format") != INDEX_FORMAT or header.get("version") != 2:
            raise ShardError(f"{path}: sample index format {header.get('format')!r} version "
                             f"{header.get('version')!r}, expected {INDEX_FORMAT!r} version 2")
        start = _aligned(16 + length)
        columns = {}
        for column in _INDEX_COLUMNS:
            spec = header["columns"][column]
            dtype = np.dtype(spec["dtype"])
            count = int(np.prod(spec["shape"], dtype=np.int64))
            begin = start + int(spec["offset"])
            end = begin + count * dtype.itemsize
            if end > raw.size or count != header["samples"]:
                raise ShardError(f"{path}: column {column!r} lies outside the file (a "
                                 f"truncated index)")
            columns[column] = raw[begin:end].view(dtype)
    except (ValueError, KeyError, TypeError) as err:  # incl. JSONDecodeError
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"{path}: malformed sample index ({type(err).__name__}: {err})") from None
    return SampleIndex(**columns)


@dataclass(frozen=True)
class ShardSet:
    """Shards described by a manifest (`open_shards`); samples numbered in shard order."""

    location: str
    names: tuple[str, ...]
    counts: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...] | None = None
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    cache_dir: Path | None = field(default=None, compare=False, repr=False)

    @property
    def root(self) -> str:
        return self.location

    @property
    def samples(self) -> int:
        return sum(self.counts)

    def offsets(self) -> list[int]:
        """Global index of each shard's first sample."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(int).tolist()

    @cached_property
    def _entries(self) -> dict[str, dict[str, Any]]:
        entries = {s["name"]: s for s in self.manifest.get("shards", [])}
        if "index" in self.manifest:
            entries[self.manifest["index"]["name"]] = self.manifest["index"]
        return entries

    def _file(self, name: str) -> Path:
        if self.cache_dir is None:
            return Path(self.location) / name
        entry = self._entries.get(name, {})
        return cached_copy(self.location, name, self.cache_dir, entry.get("bytes"),
                           entry.get("sha256"))

    def shard_path(self, shard: int) -> Path:
        """Local path of shard `shard` (downloaded into the cache first if remote)."""
        return self._file(self.names[shard])

    @property
    def paths(self) -> list[str]:
        return [str(self.shard_path(i)) for i in range(len(self.names))]

    def shard_index(self, shard: int) -> ShardIndex:
        name = self.names[shard]
        if "index" in self.manifest:  # one consolidated index: a slice of it
            index, start = self.index, self.offsets()[shard]
            part = slice(start, start + self.counts[shard])
            return ShardIndex(tuple(k.decode("utf-8") for k in index.keys[part].tolist()),
                              *(np.array(getattr(index, c)[part], dtype=np.int64)
                                for c in ("labels", "offsets", "sizes")))
        sidecar = name + INDEX_SUFFIX
        listed = (self.manifest.get("shards") or [{}] * (shard + 1))[shard].get("index")
        if listed or (self.cache_dir is None and (Path(self.location) / sidecar).is_file()):
            path = self._file(listed or sidecar)
            try:
                index = index_from_json(json.loads(path.read_bytes()), str(path))
            except json.JSONDecodeError as err:
                raise ShardError(f"{path}: not valid JSON ({err})") from None
        else:
            index = scan_shard(self.shard_path(shard))
        where = f"{self.location}/{name}"
        if len(index.keys) != self.counts[shard]:
            raise ShardError(f"{where}: holds {len(index.keys)} samples, the manifest says "
                             f"{self.counts[shard]}; re-create the shards")
        if index.labels.size and (index.labels.min() < 0
                                  or index.labels.max() >= self.num_classes):
            bad = int(np.flatnonzero((index.labels < 0) | (index.labels >= self.num_classes))[0])
            raise ShardError(f"{where}: sample {index.keys[bad]!r} has label "
                             f"{int(index.labels[bad])}, outside the manifest's "
                             f"{self.num_classes} classes")
        if index.sizes.size and int(index.sizes.max()) > MAX_MEMBER_BYTES:
            raise ShardError(f"{where}: a sample of {int(index.sizes.max()):,} bytes exceeds the "
                             f"{MAX_MEMBER_BYTES:,} allowed; the shard was refused")
        return index

    @cached_property
    def index(self) -> SampleIndex:
        """The global sample index: the consolidated `index.bin` memory-mapped (shared by the
        processes of a node), or, for older shard sets, built from the per-shard sidecars or
        scans once per process (forked workers inherit it)."""
        if "index" in self.manifest:
            path = self._file(self.manifest["index"]["name"])
            index = load_sample_index(path)
            self._check_index(index, str(path))
            return index
        parts = [self.shard_index(i) for i in range(len(self.names))]
        keys = [k for part in parts for k in part.keys]
        return SampleIndex(
            shard=np.concatenate([np.full(len(p.keys), i, dtype=np.int32)
                                  for i, p in enumerate(parts)]),
            offsets=np.concatenate([p.offsets for p in parts]),
            sizes=np.concatenate([p.sizes for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            keys=np.array([k.encode("utf-8") for k in keys], dtype=bytes))

    def _check_index(self, index: SampleIndex, where: str) -> None:
        """The consolidated index agrees with the manifest: shard by shard, the counts, labels
        within the classes, no oversize member (vectorised: ~10 ms at 1.28 M samples)."""
        shard = index.shard
        if shard.size != self.samples:
            raise ShardError(f"{where}: {shard.size} samples, the manifest says {self.samples}; "
                             f"re-create the shards")
        if shard.size and (shard[0] < 0 or shard[-1] >= len(self.names)
                           or bool(np.any(np.diff(shard) < 0))):
            raise ShardError(f"{where}: shard numbers out of order or range; re-create the shards")
        counts = np.bincount(shard, minlength=len(self.names))
        wrong = np.flatnonzero(counts != np.asarray(self.counts))
        if wrong.size:
            i = int(wrong[0])
            raise ShardError(f"{self.location}/{self.names[i]}: holds {int(counts[i])} samples in "
                             f"{where}, the manifest says {self.counts[i]}; re-create the shards")
        labels = index.labels
        outside = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if outside.size:
            bad = int(outside[0])
            raise ShardError(f"{self.location}/{self.names[int(shard[bad])]}: sample "
                             f"{index.key(bad)!r} has label {int(labels[bad])}, outside the "
                             f"manifest's {self.num_classes} classes")
        if index.sizes.size and (int(index.sizes.max()) > MAX_MEMBER_BYTES
                                 or int(index.offsets.min()) < 0):
            raise ShardError(f"{where}: a sample of {int(index.sizes.max()):,} bytes exceeds the "
                             f"{MAX_MEMBER_BYTES:,} allowed (or a negative offset); refused")


def _json_problem(raw: bytes) -> str | None:
    """Why `raw` is not a JSON document, or None."""
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return (f"not valid JSON ({err}): cut short by the network, or not a manifest written "
                f"by stages/shards.py")
    return None


def open_shards(location: str | os.PathLike) -> ShardSet:
    """Open the shards under `location` (a directory or a URL prefix, see the module doc).

    The manifest is checked as fully as the converter writes it: required keys and types,
    counts that add up, named classes, shard files present (local) or fetchable (remote).
    """
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    remote = is_remote(text)
    cache_dir = None
    if remote:
        # the manifest has no size to check it against: a body cut short without a
        # Content-Length shows as invalid JSON, retried like any other network fault
        raw = fetch_bytes(text, MANIFEST_NAME, check=_json_problem)
        digest = hashlib.sha256(text.encode() + b"\0" + raw).hexdigest()[:20]
        cache_dir = cache_root() / digest
        clean_stale_parts(cache_dir)  # of downloads killed long ago
        where = fetch.source_of(text, MANIFEST_NAME)
    else:
        path = Path(text) / MANIFEST_NAME
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no shard manifest; create the shards with "
                                    f"`python stages/shards.py --tsv FILE --out {text}`")
        raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{where}: not valid JSON ({err}); {_CREATE_SHARDS}") from None
    check_manifest(manifest, where)
    unverified = unverifiable_files(manifest)
    if remote and unverified:
        warnings.warn(f"{where}: {len(unverified)} file(s) (e.g. {unverified[0]}) have no 'bytes' "
                      f"and 'sha256' (an older converter), so downloads of them cannot be "
                      f"verified: a truncated or corrupted download would go unnoticed. "
                      f"Re-create the shards with `python stages/shards.py`", UnverifiedWarning,
                      stacklevel=2)
    names = tuple(s["name"] for s in manifest["shards"])
    if not remote:
        missing = [n for n in names if not (Path(text) / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{text}: shards listed in manifest.json are missing: "
                                    f"{missing[:3]}; re-create the shards")
    class_names = manifest.get("class_names")
    return ShardSet(location=text, names=names,
                    counts=tuple(int(s["samples"]) for s in manifest["shards"]),
                    num_classes=int(manifest["num_classes"]),
                    class_names=tuple(class_names) if class_names else None,
                    manifest=manifest, cache_dir=cache_dir)


class SampleReader:
    """Reads samples' encoded bytes at their offsets; one per process.

    Keeps at most `max_open` shard files open (least recently used closed first): an epoch's
    random reads touch every shard, and an ImageNet-sized set (1,001 shards) would otherwise
    exceed the common 1,024 open-file limit in every loader worker.
    """

    def __init__(self, shards: ShardSet, max_open: int | None = None) -> None:
        self.shards = shards
        self.max_open = MAX_OPEN_SHARDS if max_open is None else max_open
        if self.max_open < 1:
            raise ValueError(f"max_open must be >= 1, not {self.max_open}")
        self._files: dict[int, int] = {}  # shard -> fd, in order of use (least recent first)

    def _fd(self, shard: int) -> int:
        fd = self._files.pop(shard, None)
        if fd is not None:
            self._files[shard] = fd  # now the most recent
            return fd
        path = self.shards.shard_path(shard)
        while len(self._files) >= self.max_open:
            os.close(self._files.pop(next(iter(self._files))))
        fd = self._files[shard] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, i: int) -> bytes:
        index = self.shards.index
        shard = int(index.shard[i])
        fd = self._fd(shard)
        size = int(index.sizes[i])
        data = os.pread(fd, size, int(index.offsets[i]))
        if len(data) != size:
            raise SampleReadError(f"{self.shards.names[shard]}: sample {index.key(i)!r} is cut "
                                  f"short ({len(data)} of {size} bytes): a truncated shard")
        return data

    @property
    def open_files(self) -> int:
        return len(self._files)

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


MAX_OPEN_SHARDS = 32  # open shard files per process (SampleReader); each loader worker has its own

_raised_limit = False


def raise_open_file_limit() -> None:
    """Raise this process's soft open-file limit (RLIMIT_NOFILE) to its hard limit, once; loader
    workers forked afterwards inherit it. The shards need few files (`MAX_OPEN_SHARDS`), but
    loader workers pass batches through file descriptors too."""
    global _raised_limit
    if _raised_limit:
        return
    _raised_limit = True
    import logging
    import resource

    log = logging.getLogger(__name__)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # an infinite hard limit: Linux refuses an infinite NOFILE soft limit, so ask for 2^20
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("open-file limit raised from %d to %d", soft, target)
    except (ValueError, OSError) as err:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, err)


def check_same_classes(train: ShardSet, val: ShardSet) -> None:
    """Every class of the val split must have training samples: a kNN bank or a linear probe
    can never predict a class it has never seen, so such a test split measures nothing."""
    if val.num_classes > train.num_classes:
        raise ShardError(f"{val.root}: {val.num_classes} classes, but the training shards "
                         f"{train.root} have {train.num_classes}; use splits of one dataset")
    trained = np.bincount(train.index.labels, minlength=train.num_classes) > 0
    tested = np.bincount(val.index.labels, minlength=train.num_classes) > 0
    unseen = np.flatnonzero(tested & ~trained).tolist()
    if unseen:
        names = [train.class_names[c] if train.class_names else str(c) for c in unseen[:5]]
        raise ShardError(f"{val.root}: classes {names} have val samples but no training sample "
                         f"in {train.root}; no classifier can predict them: rebuild the splits "
                         f"so every val class is in train")
