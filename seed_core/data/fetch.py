"""Downloads of remote shard-set files into the local cache, verified, resumable and bounded.

One file moves like this (`download`): under a per-file lock, its bytes stream into
`NAME.part` in the cache directory (never whole in memory); a dropped HTTP connection resumes
with a `Range` request from the bytes already there; connection errors, timeouts,
`IncompleteRead` and 5xx answers are retried with exponential backoff, a bounded number of
times. Before `NAME.part` is renamed to `NAME`, its size and sha256 are checked against the
manifest's, so a body cut short (with or without a Content-Length) or corrupted is never cached:
it is retried, then it is an error naming the file and its URL.

The cache has an optional size cap (least-recently-used complete files are evicted; a file
opened by a reader stays readable after its unlink, so eviction never breaks a read in
progress) and a free-disk check before each download. `.part` files older than
`STALE_PART_S` whose lock nobody holds (killed downloads) are removed.

Environment:
    SEED_SHARD_CACHE: the cache root (default `~/.cache/seed-distill/shards`).
    SEED_SHARD_CACHE_MAX_BYTES: cap on the cache root's size; 0 (default) = no cap.
    SEED_FETCH_RETRIES: retries after the first attempt (default 5).
    SEED_FETCH_BACKOFF_S: first retry delay, doubled each retry up to 60 s (default 1).
    SEED_FETCH_TIMEOUT_S: socket timeout of one HTTP request, and 10x it for a `pipe:` command
        (default 60).

Why our own code and not a library: webdataset's `wids` downloads with `curl -o` straight to the
final name (no retry, no Range resume, no size or hash check) and is a separate package;
fsspec's `filecache`/`simplecache` copy whole files without a hash check, size cap or LRU
eviction, and its HTTP backend needs aiohttp; MosaicML Streaming has the design we follow
(per-shard hashes in the index, bounded download retries, a cache limit with LRU eviction) but
only for its own MDS format. fsspec stays the reader of other schemes (`s3://`, `gs://`...).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import random
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from seed_core.io import UserError, is_disk_full

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
PART_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"
STALE_PART_S = 3600.0
MAX_BACKOFF_S = 60.0
# a file used this recently is never evicted: its reader may be between looking the path up
# and opening it (an opened file survives its unlink, a path about to be opened does not)
EVICT_MIN_AGE_S = 10.0
_RETRY_STATUS = frozenset({408, 425, 429})


class FetchError(UserError, ValueError):
    """A remote file could not be fetched intact (after the bounded retries), or cannot fit."""


class _Retry(Exception):
    """One attempt failed in a way that another attempt may not."""


@dataclass(frozen=True)
class FetchPolicy:
    retries: int = 5  # after the first attempt: 6 attempts, ~31 s of backoff at 1 s
    backoff_s: float = 1.0
    timeout_s: float = 60.0  # per socket operation, so a stalled server is an error, not a hang
    cache_max_bytes: int = 0  # 0: no cap

    @classmethod
    def from_env(cls) -> "FetchPolicy":
        """The policy from the SEED_FETCH_* and SEED_SHARD_CACHE_MAX_BYTES variables."""
        def number(name: str, kind: type, default: float, least: float) -> float:
            raw = os.environ.get(name)
            if raw in (None, ""):
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise FetchError(f"{name}={raw!r}: not a{'n integer' if kind is int else ' number'}"
                                 ) from None
            if value < least:
                raise FetchError(f"{name}={raw!r}: must be >= {least}")
            return value

        return cls(retries=int(number("SEED_FETCH_RETRIES", int, cls.retries, 0)),
                   backoff_s=number("SEED_FETCH_BACKOFF_S", float, cls.backoff_s, 0.0),
                   timeout_s=number("SEED_FETCH_TIMEOUT_S", float, cls.timeout_s, 0.001),
                   cache_max_bytes=int(number("SEED_SHARD_CACHE_MAX_BYTES", int,
                                              cls.cache_max_bytes, 0)))


def cache_root() -> Path:
    return Path(os.environ.get("SEED_SHARD_CACHE")
                or Path.home() / ".cache" / "seed-distill" / "shards")


def source_of(location: str, name: str) -> str:
    """What a reader of `location` fetches for `name`: a URL, or a pipe: command."""
    if location.startswith("pipe:"):
        return location.replace("{name}", shlex.quote(name))
    return location.rstrip("/") + "/" + name


# ----------------------------------------------------------------------------- one attempt


def _part_size(part: Path) -> int:
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def _copy_stream(source, part: Path, append: bool) -> int:
    """Copy `source` to its end into `part`; returns the bytes copied."""
    copied = 0
    try:
        with open(part, "ab" if append else "wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                out.write(chunk)
                copied += len(chunk)
    except OSError as err:
        if is_disk_full(err):
            raise FetchError(f"{part.parent}: no space left while writing {part.name} "
                             f"({os.strerror(err.errno)}); free space there or point "
                             f"SEED_SHARD_CACHE at a larger disk") from None
        raise
    return copied


def _http_attempt(url: str, part: Path, size: int | None, policy: FetchPolicy) -> None:
    have = _part_size(part)
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None and have == size:
        return  # complete from an earlier attempt: only the verification is left
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=policy.timeout_s)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416 and have:  # our part is not a prefix of the file: start over
            part.unlink(missing_ok=True)
            raise _Retry(f"HTTP 416 for a resume at byte {have:,}") from None
        if err.code >= 500 or err.code in _RETRY_STATUS:
            raise _Retry(f"HTTP {err.code} {err.reason}") from None
        raise FetchError(f"{url}: cannot read it (HTTP {err.code} {err.reason})") from None
    with response:
        append = False
        if have and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                part.unlink(missing_ok=True)
                raise _Retry(f"a resume at byte {have:,} got Content-Range {content_range!r}")
            append = True
        copied = _copy_stream(response, part, append)  # a 200 to a Range request: whole again
        # http.client's read(n) ends quietly, without IncompleteRead, when the connection closes
        # before Content-Length bytes: only this count catches a drop where the manifest has
        # no size (an older converter) or the file is the manifest itself
        announced = response.headers.get("Content-Length", "")
        if announced.isdigit() and copied < int(announced):
            raise _Retry(f"connection closed after {copied:,} of the {int(announced):,} bytes "
                         f"announced (IncompleteRead)")  # the prefix stays: resumed by Range


def _pipe_attempt(command: str, part: Path, policy: FetchPolicy) -> None:
    with open(part, "wb") as out:
        try:
            done = subprocess.run(command, shell=True, stdout=out, stderr=subprocess.PIPE,
                                  timeout=policy.timeout_s * 10)
        except subprocess.TimeoutExpired:
            raise _Retry(f"no end after {policy.timeout_s * 10:g} s") from None
    if done.returncode != 0:
        raise _Retry(f"exit {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}")


def _fsspec_attempt(url: str, part: Path) -> None:
    try:
        import fsspec
    except ImportError:
        raise FetchError(f"{url}: unknown location scheme; install fsspec and its backend for "
                         f"it, or use a local directory or http(s)://") from None
    have = _part_size(part)
    try:
        source = fsspec.open(url, "rb").open()
    except (ImportError, ValueError) as err:  # unknown protocol, or its backend is absent
        location = url.rpartition("/")[0]
        raise FetchError(f"{location}: fsspec cannot read this scheme ({err})") from None
    except FileNotFoundError as err:
        raise FetchError(f"{url}: cannot read it ({err})") from None
    with source:
        if have:
            source.seek(have)
        _copy_stream(source, part, append=bool(have))


def _problem(part: Path, size: int | None, sha256: str | None) -> str | None:
    """Why `part` is not the file the manifest describes, or None. A short part is kept (it is
    a prefix to resume from); a long or corrupted one is deleted."""
    actual = _part_size(part)
    if size is not None and actual < size:
        return f"cut short: {actual:,} of {size:,} bytes"
    if size is not None and actual > size:
        part.unlink(missing_ok=True)
        return f"{actual:,} bytes, the manifest says {size:,}"
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            part.unlink(missing_ok=True)
            return f"sha256 {digest.hexdigest()[:16]}..., the manifest says {sha256[:16]}..."
    return None


def fetch_to(location: str, name: str, part: Path, *, size: int | None = None,
             sha256: str | None = None, policy: FetchPolicy | None = None,
             check: Callable[[bytes], str | None] | None = None) -> None:
    """Fetch remote file `name` of `location` into `part`, verified against `size` and
    `sha256` when given, and by `check` (the whole content -> why it is not the file, or None;
    for small files that carry no size, such as the manifest) when given; retried with
    exponential backoff, resumed where HTTP allows. Raises FetchError, leaving no `part`, when
    it cannot."""
    policy = policy or FetchPolicy.from_env()
    source = source_of(location, name)
    if location.startswith("pipe:") and "{name}" not in location:
        raise FetchError(f"{location}: a pipe: location needs a {{name}} placeholder for the "
                         f"file to read, e.g. pipe:curl -sf https://host/shards/{{name}}")
    attempts = policy.retries + 1
    reason = ""
    for attempt in range(attempts):
        if attempt:
            delay = min(policy.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
            time.sleep(delay * random.uniform(0.5, 1.0))  # jitter: ranks do not retry in step
        try:
            if location.startswith("pipe:"):
                _pipe_attempt(source[len("pipe:"):], part, policy)
            elif location.startswith(("http://", "https://")):
                _http_attempt(source, part, size, policy)
            else:
                _fsspec_attempt(source, part)
            reason = _problem(part, size, sha256) or ""
            if not reason and check is not None:
                reason = check(part.read_bytes()) or ""
                if reason:  # e.g. cut short without a Content-Length: fetch it whole again
                    part.unlink(missing_ok=True)
            if not reason:
                return
        except _Retry as err:
            reason = str(err)
        except FetchError:  # not worth retrying (404, unknown scheme, disk full)
            part.unlink(missing_ok=True)
            raise
        except (OSError, http.client.HTTPException) as err:  # incl. timeouts, IncompleteRead
            reason = f"{type(err).__name__}: {err}"
        log.warning("%s: attempt %d of %d failed: %s", source, attempt + 1, attempts, reason)
    # a failed download leaves nothing behind; a killed one leaves a prefix, resumed next time
    part.unlink(missing_ok=True)
    raise FetchError(f"{source}: cannot read it intact after {attempts} attempt(s) "
                     f"(last: {reason}); raise SEED_FETCH_RETRIES / SEED_FETCH_TIMEOUT_S or fix "
                     f"the server")


def fetch_bytes(location: str, name: str, policy: FetchPolicy | None = None,
                check: Callable[[bytes], str | None] | None = None) -> bytes:
    """The bytes of a small remote file (the manifest), fetched with the same retries and
    verified by `check` (see `fetch_to`)."""
    with tempfile.TemporaryDirectory(prefix="seed-fetch-") as tmp:
        part = Path(tmp) / (Path(name).name + PART_SUFFIX)
        fetch_to(location, name, part, policy=policy, check=check)
        return part.read_bytes()


# ----------------------------------------------------------------------------- the cache


@contextlib.contextmanager
def file_lock(path: Path, shared: bool = False) -> Iterator[None]:
    """An exclusive (or shared) flock on `path.lock`, across the processes of a node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + LOCK_SUFFIX), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _lock_is_free(lock_path: Path) -> bool:
    try:
        with open(lock_path, "r") as lock:  # never created here: no lock file, no holder
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def clean_stale_parts(cache_dir: Path, max_age_s: float = STALE_PART_S) -> list[Path]:
    """Remove `.part` files older than `max_age_s` that no download holds; returns them."""
    removed = []
    now = time.time()
    for part in cache_dir.glob("*" + PART_SUFFIX) if cache_dir.is_dir() else ():
        lock = part.with_name(part.name[:-len(PART_SUFFIX)] + LOCK_SUFFIX)
        with contextlib.suppress(FileNotFoundError):
            if now - part.stat().st_mtime > max_age_s and _lock_is_free(lock):
                part.unlink()
                removed.append(part)
    return removed


def _cached_files(root: Path) -> tuple[int, list[tuple[float, int, Path]]]:
    """(bytes used under `root`, [(last use, bytes, path)] of its complete files)."""
    used, files = 0, []
    for directory in (d for d in root.iterdir() if d.is_dir()) if root.is_dir() else ():
        for entry in os.scandir(directory):
            with contextlib.suppress(FileNotFoundError):
                if not entry.is_file(follow_symlinks=False) or entry.name.endswith(LOCK_SUFFIX):
                    continue
                stat = entry.stat(follow_symlinks=False)
                used += stat.st_size
                if not entry.name.endswith(PART_SUFFIX):
                    files.append((stat.st_mtime, stat.st_size, Path(entry.path)))
    return used, files


def make_room(root: Path, target: Path, needed: int, policy: FetchPolicy) -> list[Path]:
    """Evict least-recently-used files under `root` so that `needed` more bytes fit the cap,
    then check the disk has `needed` bytes free. Returns the evicted files."""
    evicted: list[Path] = []
    if policy.cache_max_bytes and needed:
        with file_lock(root / ".evict"):
            used, files = _cached_files(root)
            recent = time.time() - EVICT_MIN_AGE_S
            for mtime, nbytes, path in sorted(files):
                if used + needed <= policy.cache_max_bytes:
                    break
                if path == target or mtime > recent:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    used -= nbytes
                    evicted.append(path)
            if used + needed > policy.cache_max_bytes:
                log.warning("%s: %s bytes in use + %s for %s exceed SEED_SHARD_CACHE_MAX_BYTES="
                            "%s; every other file was used in the last %g s", root, f"{used:,}",
                            f"{needed:,}", target.name, policy.cache_max_bytes, EVICT_MIN_AGE_S)
    free = shutil.disk_usage(target.parent).free
    if needed > free:
        raise FetchError(f"{target.parent}: {target.name} needs {needed:,} bytes, the disk has "
                         f"{free:,} free; free space there, point SEED_SHARD_CACHE at a larger "
                         f"disk, or cap the cache with SEED_SHARD_CACHE_MAX_BYTES")
    return evicted


def touch(path: Path) -> None:
    """Mark `path` as just used (the LRU order of eviction: mtime, since atime is often off)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def download(location: str, name: str, target: Path, *, size: int | None = None,
             sha256: str | None = None, root: Path | None = None,
             policy: FetchPolicy | None = None) -> Path:
    """`target`, the verified local copy of remote file `name`, fetched once per node.

    Concurrent callers (loader workers, ranks) wait on one lock per file; the file appears by
    an atomic rename of its verified `.part`, so a reader never sees a partial file.
    """
    if target.is_file():
        touch(target)
        return target
    policy = policy or FetchPolicy.from_env()
    with file_lock(target):
        if target.is_file():  # another process fetched it while we waited
            touch(target)
            return target
        part = target.with_name(target.name + PART_SUFFIX)
        if size is not None:
            make_room(root or target.parent.parent, target, max(size - _part_size(part), 0),
                      policy)
        fetch_to(location, name, part, size=size, sha256=sha256, policy=policy)
        os.replace(part, target)
    return target


__all__ = ["FetchError", "FetchPolicy", "cache_root", "clean_stale_parts", "download",
           "fetch_bytes", "fetch_to", "file_lock", "make_room", "source_of", "touch"]
