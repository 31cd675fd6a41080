"""SimCLR (converted release): 'state_dict' with plain keys; the supervised fc is dropped."""

from __future__ import annotations

from typing import Any

from seed_core.teachers.common import (Extracted, TeacherFormat, get_path, has_prefix,
                                       is_state_dict, need_state, split_state)




def _detect_simclr(obj: Any) -> bool:
    state = get_path(obj, "state_dict")
    return is_state_dict(state) and not has_prefix(state, "module.") and \
        any(k.startswith(("conv1", "conv_stem")) for k in state)


def _extract_simclr(obj: Any) -> Extracted:
    state = need_state(get_path(obj, "state_dict"), "simclr", "'state_dict' with plain keys", obj)
    out = split_state(state, "simclr", prefix="", head=None)
    out.drop_classifier = True
    return out


FORMATS = [
    TeacherFormat("simclr", "SimCLR converted release: 'state_dict' with plain keys",
                  _detect_simclr, _extract_simclr),
]
