"""VISSL: `classy_state_dict.base_model.model.trunk._feature_blocks.*`; heads are dropped."""

from __future__ import annotations

from typing import Any

from seed_core.teachers.common import (Extracted, TeacherFormat, get_path, has_prefix,
                                       is_state_dict, need_state, split_state)




def _vissl_state(obj: Any) -> Any:
    return get_path(obj, "classy_state_dict", "base_model", "model", "trunk")


def _detect_vissl(obj: Any) -> bool:
    trunk = _vissl_state(obj)
    return is_state_dict(trunk) and has_prefix(trunk, "_feature_blocks.")


def _extract_vissl(obj: Any) -> Extracted:
    trunk = need_state(_vissl_state(obj), "vissl", "'classy_state_dict.base_model.model.trunk'",
                       obj)
    return split_state(trunk, "vissl", prefix="_feature_blocks.", head=None)


FORMATS = [
    TeacherFormat("vissl", "VISSL: classy_state_dict.base_model.model.trunk._feature_blocks.*",
                  _detect_vissl, _extract_vissl),
]
