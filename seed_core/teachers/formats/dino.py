"""DINO (Caron et al. 2021): the full checkpoint's 'teacher', `backbone.*` and the `head.mlp.*`
projection (GELU); `head.last_layer` (the prototypes) is dropped."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from seed_core.teachers.common import (CheckpointError, Extracted, TeacherFormat, describe,
                                       has_prefix, is_state_dict, split_with_head, unwrap_module)




def _dino_state(obj: Any) -> Mapping[str, torch.Tensor] | None:
    state = obj.get("teacher") if isinstance(obj, Mapping) else None
    if state is None and is_state_dict(obj):
        state = obj  # the teacher's state dict saved on its own
    if not is_state_dict(state):
        return None
    state = unwrap_module(state)
    if has_prefix(state, "backbone.") and (has_prefix(state, "head.mlp.")
                                            or has_prefix(state, "head.last_layer.")):
        return state
    return None


def _detect_dino(obj: Any) -> bool:
    return _dino_state(obj) is not None


def _extract_dino(obj: Any) -> Extracted:
    state = _dino_state(obj)
    if state is None:
        raise CheckpointError("not a dino checkpoint: expected 'teacher' with 'backbone.*' and "
                              f"'head.mlp.*' keys; got {describe(obj)}")
    out = split_with_head(state, "dino", "backbone.", "head.mlp.", ("head.last_layer.",))
    out.activation = "gelu"
    return out


FORMATS = [
    TeacherFormat("dino", "DINO full checkpoint: 'teacher', module.backbone.*, head.mlp.*",
                  _detect_dino, _extract_dino),
]
