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
`~/.cache/seed-distill/shards`), under the manifest's hash, atomically and under a file lock so
concurrent loader workers download each shard once; samples are then read at their byte offsets.

The sample index (key, label, byte offset and size of the image member, per sample) comes from
the `shard-NNNNNN.idx.json` sidecars the converter writes; shards from elsewhere are scanned
once. Tar members with absolute or `..` paths, links or devices, and members larger than
`MAX_MEMBER_BYTES` are refused with an error naming the shard and the member.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np

from seed_core.io import UserError

MANIFEST_NAME = "manifest.json"
INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "seed-distill-shard-index"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm")
# one encoded image; ImageNet's largest JPEG is ~15 MB
MAX_MEMBER_BYTES = 64 << 20
DOWNLOAD_TIMEOUT_S = 60.0
_CREATE_SHARDS = "create the shards with `python stages/shards.py --tsv FILE --out DIR`"


class ShardError(UserError, ValueError):
    """A manifest, index or shard is missing, inconsistent or unsafe."""


class SampleReadError(OSError):
    """One sample's bytes could not be read (truncated or unreadable shard)."""


# ----------------------------------------------------------------------------- locations


def is_remote(location: str) -> bool:
    return location.startswith("pipe:") or "://" in location


def cache_root() -> Path:
    return Path(os.environ.get("SEED_SHARD_CACHE")
                or Path.home() / ".cache" / "seed-distill" / "shards")


def fetch_bytes(location: str, name: str) -> bytes:
    """The bytes of file `name` under a remote `location` (http(s), pipe: or fsspec)."""
    if location.startswith("pipe:"):
        command = location[len("pipe:"):]
        if "{name}" not in command:
            raise ShardError(f"{location}: a pipe: location needs a {{name}} placeholder for the "
                             f"file to read, e.g. pipe:curl -sf https://host/shards/{{name}}")
        done = subprocess.run(command.replace("{name}", shlex.quote(name)), shell=True,
                              capture_output=True, timeout=DOWNLOAD_TIMEOUT_S * 10)
        if done.returncode != 0:
            raise ShardError(f"{location}: reading {name} failed (exit {done.returncode}): "
                             f"{done.stderr.decode(errors='replace')[-300:]}")
        return done.stdout
    url = location.rstrip("/") + "/" + name
    if location.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                return response.read()
        except (urllib.error.URLError, OSError) as err:
            raise ShardError(f"{url}: cannot read it ({err})") from None
    try:
        import fsspec
    except ImportError:
        raise ShardError(f"{location}: unknown location scheme; install fsspec and its backend "
                         f"for it, or use a local directory or http(s)://") from None
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except (ImportError, ValueError) as err:  # unknown protocol, or its backend is absent
        raise ShardError(f"{location}: fsspec cannot read this scheme ({err})") from None
    except OSError as err:
        raise ShardError(f"{url}: cannot read it ({err})") from None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_copy(location: str, name: str, cache_dir: Path) -> Path:
    """A local copy of remote file `name`, downloaded once (atomically, under a lock)."""
    target = cache_dir / name
    if target.is_file():
        return target
    with _file_lock(target):
        if not target.is_file():  # another process may have fetched it while we waited
            data = fetch_bytes(location, name)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
    return target


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

    def _file(self, name: str) -> Path:
        if self.cache_dir is None:
            return Path(self.location) / name
        return cached_copy(self.location, name, self.cache_dir)

    def shard_path(self, shard: int) -> Path:
        """Local path of shard `shard` (downloaded into the cache first if remote)."""
        return self._file(self.names[shard])

    @property
    def paths(self) -> list[str]:
        return [str(self.shard_path(i)) for i in range(len(self.names))]

    def shard_index(self, shard: int) -> ShardIndex:
        name = self.names[shard]
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
        """The global sample index (built once per process; forked workers inherit it)."""
        parts = [self.shard_index(i) for i in range(len(self.names))]
        keys = [k for part in parts for k in part.keys]
        return SampleIndex(
            shard=np.concatenate([np.full(len(p.keys), i, dtype=np.int32)
                                  for i, p in enumerate(parts)]),
            offsets=np.concatenate([p.offsets for p in parts]),
            sizes=np.concatenate([p.sizes for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            keys=np.array([k.encode("utf-8") for k in keys], dtype=bytes))


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
        raw = fetch_bytes(text, MANIFEST_NAME)
        digest = hashlib.sha256(text.encode() + b"\0" + raw).hexdigest()[:20]
        cache_dir = cache_root() / digest
        where = f"{text.rstrip('/')}/{MANIFEST_NAME}"
    else:
        path = Path(text) / MANIFEST_NAME
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no shard manifest; create the shards with "
                                    f"`python stages/shards.py --tsv FILE --out {text}`")
        raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ShardError(f"{where}: not valid JSON ({err}); {_CREATE_SHARDS}") from None
    check_manifest(manifest, where)
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
    """Reads samples' encoded bytes at their offsets; one per process (keeps files open)."""

    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards
        self._files: dict[int, int] = {}

    def read(self, i: int) -> bytes:
        index = self.shards.index
        shard = int(index.shard[i])
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.shards.shard_path(shard), os.O_RDONLY)
        size = int(index.sizes[i])
        data = os.pread(fd, size, int(index.offsets[i]))
        if len(data) != size:
            raise SampleReadError(f"{self.shards.names[shard]}: sample {index.key(i)!r} is cut "
                                  f"short ({len(data)} of {size} bytes): a truncated shard")
        return data

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


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
