"""Barlow Twins: 'model' with `module.backbone.*` and the `projector.*` head."""

from __future__ import annotations

from typing import Any

import torch

from seed_core.teachers.common import (Extracted, TeacherFormat, get_path, has_prefix,
                                       is_state_dict, need_state, split_with_head, unwrap_module)




def _barlow_state(obj: Any) -> dict[str, torch.Tensor] | None:
    state = get_path(obj, "model")
    if not is_state_dict(state):
        return None
    state = unwrap_module(state)
    return state if has_prefix(state, "backbone.") else None


def _detect_barlow_twins(obj: Any) -> bool:
    return _barlow_state(obj) is not None


def _extract_barlow_twins(obj: Any) -> Extracted:
    state = need_state(_barlow_state(obj), "barlow_twins", "'model' with 'module.backbone.*' keys",
                  obj)
    # `bn` is the affine-free BatchNorm of the loss (cross-correlation), not part of the head
    return split_with_head(state, "barlow_twins", "backbone.", "projector.", ("bn.",))


FORMATS = [
    TeacherFormat("barlow_twins", "Barlow Twins: 'model', module.backbone.*, module.projector.*",
                  _detect_barlow_twins, _extract_barlow_twins),
]
