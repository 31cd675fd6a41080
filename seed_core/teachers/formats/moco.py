"""MoCo v1/v2/v3: 'state_dict' with `module.encoder_q.*` (v1 Linear fc, v2 MLP fc) or
`module.base_encoder.*` (v3, BN-MLP fc); key encoders, predictors and queues are dropped."""

from __future__ import annotations

from typing import Any, Callable

from seed_core.teachers.common import (Extracted, TeacherFormat, has_prefix, need_state,
                                       split_state, state_dict_entry)




def _detect_moco_v3(obj: Any) -> bool:
    state = state_dict_entry(obj)
    return state is not None and has_prefix(state, "base_encoder.")


def _extract_moco_v3(obj: Any) -> Extracted:
    state = need_state(state_dict_entry(obj), "moco_v3",
                  "'state_dict' with 'module.base_encoder.*' keys", obj)
    return split_state(state, "moco_v3", prefix="base_encoder.", head="fc.",
                  drop=("momentum_encoder.", "predictor."))


def _detect_moco_v2(obj: Any) -> bool:
    state = state_dict_entry(obj)
    return state is not None and "encoder_q.fc.0.weight" in state


def _detect_moco_v1(obj: Any) -> bool:
    state = state_dict_entry(obj)
    return (state is not None and has_prefix(state, "encoder_q.")
            and "encoder_q.fc.0.weight" not in state)


def _extract_moco(fmt: str) -> Callable[[Any], Extracted]:
    def extract(obj: Any) -> Extracted:
        state = need_state(state_dict_entry(obj), fmt,
                      "'state_dict' with 'module.encoder_q.*' keys", obj)
        return split_state(state, fmt, prefix="encoder_q.", head="fc.",
                      drop=("encoder_k.", "queue_ptr", "queue"))
    return extract


FORMATS = [
    TeacherFormat("moco_v3", "MoCo v3: 'state_dict', module.base_encoder.* (BN-MLP fc)",
                  _detect_moco_v3, _extract_moco_v3),
    TeacherFormat("moco_v2", "MoCo v2: 'state_dict', module.encoder_q.* (MLP fc.0/fc.2)",
                  _detect_moco_v2, _extract_moco("moco_v2")),
    TeacherFormat("moco_v1", "MoCo v1: 'state_dict', module.encoder_q.* (Linear fc)",
                  _detect_moco_v1, _extract_moco("moco_v1")),
]
