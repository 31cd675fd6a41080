"""Resumable training state: written atomically, read back with `weights_only=True`.

A checkpoint holds everything a step depends on (model, optimizer, scheduler, queues, scaler,
RNG states, data position), so a run killed at any point and started again ends with the same
weights as a run that was never interrupted (same seed and world size). It is keyed by a
fingerprint of the configuration: a checkpoint from another configuration is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from seed_core.io import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"


@dataclass(frozen=True)
class Position:
    """The next step to run: step `step` of epoch `epoch` (0-based)."""

    epoch: int
    step: int

    def after(self, steps_per_epoch: int) -> "Position":
        if self.step + 1 >= steps_per_epoch:
            return Position(self.epoch + 1, 0)
        return Position(self.epoch, self.step + 1)


def source_digest(package_dir: str | Path | None = None) -> str:
    """sha256 over the library's sources: a code change invalidates old checkpoints."""
    package_dir = Path(package_dir or Path(__file__).parent)
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        digest.update(path.relative_to(package_dir).as_posix().encode())
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
    """One directory, one `last.pt`, for one configuration fingerprint."""

    def __init__(self, directory: str | Path, config_fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = config_fingerprint

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT_NAME

    def save(self, state: dict[str, Any]) -> None:
        state = {**state, "fingerprint": self.fingerprint}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        log.info("checkpoint saved at %s (epoch %d, step %d)", self.path,
                 state["position"]["epoch"], state["position"]["step"])

    def load(self) -> dict[str, Any] | None:
        """The saved state if it belongs to this configuration, else None."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            log.warning("ignoring %s: it was written by another configuration or code version",
                        self.path)
            return None
        return state

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
