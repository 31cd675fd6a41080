"""This project's canonical safetensors (`backbone.*`, `head.N.*`), see `teachers.canonical`."""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from seed_core.teachers.common import (CanonicalCheckpoint, CheckpointError, Extracted,
                                       TeacherFormat, describe, has_prefix, is_state_dict)




def _canonical_state(obj: Any) -> Mapping[str, torch.Tensor] | None:
    state = obj.tensors if isinstance(obj, CanonicalCheckpoint) else obj
    if not is_state_dict(state):
        return None
    if not all(re.match(r"backbone\.|head\.\d", k) for k in state):
        return None
    return state if has_prefix(state, "backbone.") else None


def _detect_seed_distill(obj: Any) -> bool:
    return _canonical_state(obj) is not None


def _extract_seed_distill(obj: Any) -> Extracted:
    state = _canonical_state(obj)
    if state is None:
        raise CheckpointError("not a seed_distill checkpoint: expected only 'backbone.*' and "
                              f"'head.<index>.*' tensors; got {describe(obj)}")
    return Extracted(
        backbone={k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
        head={k[len("head."):]: v for k, v in state.items() if k.startswith("head.")},
        meta=obj.meta if isinstance(obj, CanonicalCheckpoint) else None)


FORMATS = [
    TeacherFormat("seed_distill", "this project's canonical safetensors (backbone.*, head.N.*)",
                  _detect_seed_distill, _extract_seed_distill),
]
