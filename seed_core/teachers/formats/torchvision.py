"""Plain torchvision / timm state dicts; the supervised classifier is dropped."""

from __future__ import annotations

from typing import Any

from seed_core.teachers.common import (Extracted, TeacherFormat, is_state_dict, need_state,
                                       split_state)




def _detect_torchvision(obj: Any) -> bool:
    return is_state_dict(obj) and not all(k.startswith("module.") for k in obj)


def _extract_torchvision(obj: Any) -> Extracted:
    state = need_state(obj if is_state_dict(obj) else None, "torchvision",
                  "a plain state dict of tensors", obj)
    out = split_state(state, "torchvision", prefix="", head=None)
    out.drop_classifier = True
    return out


FORMATS = [
    TeacherFormat("torchvision", "plain torchvision / timm state dict (classifier dropped)",
                  _detect_torchvision, _extract_torchvision),
]
