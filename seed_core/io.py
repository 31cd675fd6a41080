"""Atomic file and directory writes, hashing, and JSON helpers.

Every output goes to a temporary sibling first and is renamed into place, so an interrupted
stage never leaves a half-written file that DVC would cache. A write that fails because the disk,
a quota or the file-size limit is full becomes a `DiskFullError` naming the output.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

# ENOSPC: no space left; EDQUOT: quota exceeded; EFBIG: the file-size limit (RLIMIT_FSIZE,
# a filesystem's maximum file size): all mean "make room, then re-run"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class UserError(Exception):
    """A problem the user fixes (an input file, a param, the disk), not a bug in the code.

    Its message names the file, key or value and says what to do; stages print it alone, without
    a traceback, and exit with status 1 (`seed_core.stagekit.user_errors`).
    """


class DiskFullError(UserError, OSError):
    """An output could not be written for lack of space; the previous output is untouched."""


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def disk_full_error(target: str | Path, err: OSError) -> DiskFullError:
    """The error to raise when writing `target` failed with a disk-full `err`."""
    target = Path(target)
    reason = os.strerror(err.errno) if err.errno else str(err)
    full = DiskFullError(
        f"{target}: could not be written: {reason} (errno {errno.errorcode.get(err.errno, '?')})"
        f". The disk, a quota or the file-size limit (ulimit -f) is full: free space on "
        f"{target.parent.resolve()} or raise the limit, then re-run. The previous {target.name}"
        f" is untouched and no partial file was left.")
    full.errno = err.errno
    return full


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            raise disk_full_error(path, err) from err
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as err:
        # a file inside the temporary directory names a path the user never sees: name the output
        if is_disk_full(err):
            raise disk_full_error(path, err) from err
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def splice_section(text: str, begin: str, end: str, section: str, where: str) -> str:
    """`text` (a README) with the lines between its marker lines `begin` and `end` replaced by
    `section`; the generated sections (results, experiments, code map, benchmarks) use it."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == begin]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise ValueError(f"{where}: needs exactly one line '{begin}' followed by one line "
                         f"'{end}' (found {len(begins)} and {len(ends)}); add them where the "
                         f"generated section belongs")
    return "".join(lines[:begins[0] + 1]) + section.rstrip("\n") + "\n" + "".join(
        lines[ends[0]:])


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def repo_root() -> Path:
    """The repository root: `DVC_ROOT` when DVC runs us (it points at the parent repo even for
    `dvc exp run --temp/--queue`), else the nearest parent of the working directory with
    `dvc.yaml` or `.git`, else the working directory. A DVC subrepo (`reproduce/`, whose
    `DVC_ROOT` is itself) belongs to the project above it, so its runs share `mlflow.db`."""
    if os.environ.get("DVC_ROOT"):
        return _outside_subrepos(Path(os.environ["DVC_ROOT"]).resolve())
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        if (candidate / "dvc.yaml").exists() or (candidate / ".git").exists():
            return _outside_subrepos(candidate)
    return cwd


def _outside_subrepos(root: Path) -> Path:
    """`root`, or the DVC project that holds it when `root` is a subrepo of one (a directory
    with `.dvc/` or `dvc.yaml` inside a project's git work tree, below its top)."""
    while not (root / ".git").exists() and root.parent != root and (
            (root.parent / ".dvc").is_dir() or (root.parent / ".git").exists()) and (
            (root.parent / "dvc.yaml").exists()):
        root = root.parent
    return root
