"""Reading checkpoints that may come from anywhere, without ever running code from them."""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from seed_core.teachers.canonical import resolve_canonical_file
from seed_core.teachers.common import META_KEY, CanonicalCheckpoint, CheckpointError


def load_untrusted(path: str | Path) -> Any:
    """Read a checkpoint without ever running code from it.

    `.safetensors` files are read with safetensors (our own files come back as a
    `CanonicalCheckpoint`); anything else goes through `torch.load(weights_only=True)`, which
    refuses pickles that reference arbitrary callables. `argparse.Namespace` (DINO stores its
    arguments) is the only class allowed beyond torch's defaults.
    """
    path = Path(path)
    if path.is_dir():
        path = resolve_canonical_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: (GLOBAL \S+)|Unsupported operand \S+", str(err))
        what = f" (it references {found.group(1) or found.group(0)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: unpickling it needs arbitrary code{what}. Nothing from the file "
            "was executed. Only if you trust where it comes from: unpickle it yourself in an "
            "isolated environment, save its tensors alone (e.g. "
            "`torch.save(ckpt['state_dict'], 'clean.pth')` or safetensors' save_file), then "
            "pass the clean file") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {err}") from None


def _read_safetensors(path: Path) -> Any:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None
    if META_KEY in header:
        return CanonicalCheckpoint(tensors=tensors, meta=json.loads(header[META_KEY]))
    return tensors


