"""Reading checkpoints that may come from anywhere, without ever running code from them."""

from __future__ import annotations

import argparse
import json
import pickle
import re
import struct
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
        # torch's first sentence is the fact; the rest of its text is generic advice
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = reason.split(". ")[0].rstrip(".")
        raise CheckpointError(f"{path}: not a readable torch checkpoint{_truncation(path)}: "
                              f"{reason}. {_AGAIN}") from None


_AGAIN = ("Copy or download it again (compare its sha256 with the source's), or pass "
          "another checkpoint")
ZIP_END = b"PK\x05\x06"  # zip end-of-central-directory record: torch.save's archives end so
ZIP_START = b"PK\x03\x04"


def _truncation(path: Path) -> str:
    """`, truncated: ...` when the file's own structure shows that its end is missing."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(0, size - (1 << 16) - 22))
        tail = f.read()
    if head.startswith(ZIP_START) and ZIP_END not in tail:
        return f" (truncated: {size} bytes, the zip archive's end record is missing)"
    if path.suffix == ".safetensors" and len(head) == 8:
        expected = _safetensors_size(path, struct.unpack("<Q", head)[0])
        if expected and size < expected:
            return f" (truncated: {size} of the {expected} bytes its header declares)"
    return ""


def _safetensors_size(path: Path, header_len: int) -> int | None:
    """The file size a safetensors header declares (8 + header + data); None if unreadable."""
    if header_len > 100 * 2**20:  # the format caps headers at 100 MB
        return None
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return 8 + header_len + max(ends, default=0)


def _read_safetensors(path: Path) -> Any:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file{_truncation(path)}: "
                              f"{err}. {_AGAIN}") from None
    if META_KEY in header:
        return CanonicalCheckpoint(tensors=tensors, meta=json.loads(header[META_KEY]))
    return tensors


