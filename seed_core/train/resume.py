"""Resumable training state: written atomically with a checksum, read back with
`weights_only=True`, the last two kept.

A checkpoint holds everything a step depends on (model, optimizer, scheduler, queues, scaler,
RNG state, data position, curves), so a run killed at any point and started again ends with the
same weights as a run that was never interrupted. It is keyed by a fingerprint of the
configuration, the global batch included but not the number of processes: the data order
depends on the global batch alone (`seed_core/data/order.py`), so a run written by 2 processes
resumes on 1 or 8.

Files: `step-NNNNNNNN.pt` and its `step-NNNNNNNN.pt.sha256`. The checksum is written after the
checkpoint, so a checkpoint cut short by a crash, a full disk or a bad copy has none that
matches; it is skipped with a warning naming it, and the previous one is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from seed_core.io import atomic_path, write_text

log = logging.getLogger(__name__)

KEEP = 2
_NAME_RE = re.compile(r"step-(\d{8})\.pt")


@dataclass(frozen=True)
class Position:
    """The next step to run: step `step` of epoch `epoch` (0-based)."""

    epoch: int
    step: int

    def after(self, steps_per_epoch: int) -> "Position":
        if self.step + 1 >= steps_per_epoch:
            return Position(self.epoch + 1, 0)
        return Position(self.epoch, self.step + 1)

    def global_step(self, steps_per_epoch: int) -> int:
        return self.epoch * steps_per_epoch + self.step


def source_digest(files: Iterable[str | Path], root: str | Path) -> str:
    """sha256 over source files (their paths relative to `root` and their bytes): a change to
    code the stage runs invalidates its old checkpoints, a change elsewhere does not."""
    digest = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(config: Mapping[str, Any]) -> str:
    blob = json.dumps(dict(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    # weights_only loading may hand tuples back as lists
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class CheckpointStore:
    """The checkpoints of one configuration in one directory; the newest `KEEP` are kept."""

    def __init__(self, directory: str | Path, config_fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = config_fingerprint
        self.loaded_from: Path | None = None  # the checkpoint `load` returned

    def checkpoints(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _NAME_RE.fullmatch(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, state: dict[str, Any], global_step: int) -> Path:
        """Write `state` as the checkpoint of `global_step`, then its checksum; prune old ones."""
        buffer = io.BytesIO()
        torch.save({**state, "fingerprint": self.fingerprint}, buffer)
        data = buffer.getvalue()
        path = self.directory / f"step-{global_step:08d}.pt"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        write_text(_checksum_path(path), hashlib.sha256(data).hexdigest() + "\n")
        log.info("checkpoint saved at %s (epoch %d, step %d)", path,
                 state["position"]["epoch"], state["position"]["step"])
        for old in self.checkpoints()[KEEP:]:
            _remove(old)
        return path

    def load(self) -> dict[str, Any] | None:
        """The newest intact checkpoint of this configuration, else None.

        A checkpoint whose checksum is missing or wrong is skipped with a warning naming it;
        one of another configuration or code version is ignored. Temporary files of a write that
        was killed are removed.
        """
        if self.directory.is_dir():
            for stray in self.directory.glob(".step-*.tmp"):
                stray.unlink(missing_ok=True)
        for path in self.checkpoints():
            problem = _verify(path)
            if problem:
                log.warning("skipping checkpoint %s: %s; using the previous one", path, problem)
                continue
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("fingerprint") != self.fingerprint:
                log.warning("ignoring %s: it was written by another configuration or code "
                            "version", path)
                return None
            self.loaded_from = path
            return state
        return None

    def clear(self) -> None:
        for path in self.checkpoints():
            _remove(path)


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verify(path: Path) -> str | None:
    """Why `path` is not an intact checkpoint, or None."""
    checksum = _checksum_path(path)
    if not checksum.is_file():
        return "no checksum beside it (the write did not finish)"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != checksum.read_text().strip():
        return "its checksum does not match (corrupt or truncated)"
    return None


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    _checksum_path(path).unlink(missing_ok=True)
