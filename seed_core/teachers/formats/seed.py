"""SEED's released students: 'state_dict' with `module.student.*` (fc MLP); the teacher and
the queue are dropped."""

from __future__ import annotations

from typing import Any

from seed_core.teachers.common import (Extracted, TeacherFormat, has_prefix, need_state,
                                       split_state, state_dict_entry)




def _detect_seed(obj: Any) -> bool:
    state = state_dict_entry(obj)
    return state is not None and has_prefix(state, "student.")


def _extract_seed(obj: Any) -> Extracted:
    state = need_state(state_dict_entry(obj), "seed", "'state_dict' with 'module.student.*' keys",
                  obj)
    return split_state(state, "seed", prefix="student.", head="fc.",
                  drop=("teacher.", "queue_ptr", "queue"))


FORMATS = [
    TeacherFormat("seed", "SEED student: 'state_dict', module.student.* (fc MLP)",
                  _detect_seed, _extract_seed),
]
