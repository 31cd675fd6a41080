"""SwAV: `module.*` with `projection_head.*`; the `prototypes` are dropped."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from seed_core.teachers.common import (Extracted, TeacherFormat, get_path, has_prefix,
                                       is_state_dict, need_state, split_state, unwrap_module)




def _swav_state(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The released files are a plain `module.*` state dict; training checkpoints nest it
    under 'state_dict'."""
    for state in (obj, get_path(obj, "state_dict")):
        if not is_state_dict(state):
            continue
        plain = unwrap_module(state)
        if has_prefix(plain, "projection_head") or has_prefix(plain, "prototypes"):
            return plain
        if state is obj and all(k.startswith("module.") for k in state):
            return plain
    return None


def _detect_swav(obj: Any) -> bool:
    return _swav_state(obj) is not None


def _extract_swav(obj: Any) -> Extracted:
    state = need_state(_swav_state(obj), "swav", "'module.*' keys with 'projection_head' or "
                  "'prototypes'", obj)
    # projection_head is a Sequential (projection_head.0.weight ...) or a single Linear
    return split_state(state, "swav", prefix="", head="projection_head.", drop=("prototypes",))


FORMATS = [
    TeacherFormat("swav", "SWAV: module.* with projection_head.*, prototypes*",
                  _detect_swav, _extract_swav),
]
