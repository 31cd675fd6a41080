"""solo-learn Lightning checkpoints: 'state_dict' with `backbone.*` and `projector.*`."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from seed_core.teachers.common import (Extracted, TeacherFormat, get_path, has_prefix,
                                       is_state_dict, need_state, split_with_head)




SOLO_EXTRAS = ("momentum_", "classifier.", "queue", "predictor.", "prototypes", "head.",
               "local_memory_")


def _solo_state(obj: Any) -> Mapping[str, torch.Tensor] | None:
    state = get_path(obj, "state_dict")
    if is_state_dict(state) and has_prefix(state, "backbone."):
        return state
    return None


def _detect_solo_learn(obj: Any) -> bool:
    return _solo_state(obj) is not None


def _extract_solo_learn(obj: Any) -> Extracted:
    state = need_state(_solo_state(obj), "solo_learn", "'state_dict' with 'backbone.*' keys", obj)
    return split_with_head(state, "solo_learn", "backbone.", "projector.", SOLO_EXTRAS)


FORMATS = [
    TeacherFormat("solo_learn", "solo-learn Lightning .ckpt: 'state_dict', backbone.*, "
                  "projector.*", _detect_solo_learn, _extract_solo_learn),
]
