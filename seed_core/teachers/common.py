"""What the teacher-format readers share: the error type, the extracted-tensors record, key
helpers, and `fit_state`, the strict key-by-key check that nothing is lost or loaded partially."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from seed_core.io import UserError

CANONICAL = "seed_distill"
SCHEMA = 1
META_KEY = "seed_distill"  # key of the JSON metadata in the safetensors header
CANONICAL_NAMES = ("teacher.safetensors", "model.safetensors")
REQUIRED_META = ("format", "arch", "small_images", "feature_dim", "embed_dim", "head",
                 "head_layout")
SHOW_KEYS = 5  # offending keys named in an error


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be read or does not fit the requested architecture."""


@dataclass(frozen=True)
class CanonicalCheckpoint:
    """A `.safetensors` file of our own: its tensors and the metadata from its header."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


@dataclass
class Extracted:
    """What a format's `extract` finds: prefix-free backbone and head tensors."""

    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    activation: str = "relu"  # activation between head layers (DINO: gelu)
    drop_classifier: bool = False  # a supervised classifier (fc.*) may sit among the keys
    dropped: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] | None = None  # our own metadata, for seed_distill files


@dataclass(frozen=True)
class TeacherFormat:
    name: str
    description: str
    detect: Callable[[Any], bool]
    extract: Callable[[Any], Extracted]


# ----------------------------------------------------------------------------- small helpers


def is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def get_path(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return None
        obj = obj[key]
    return obj


def unwrap_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DistributedDataParallel's `module.` when every key carries it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def state_dict_entry(obj: Any) -> dict[str, torch.Tensor] | None:
    state = get_path(obj, "state_dict")
    return unwrap_module(state) if is_state_dict(state) else None


def has_prefix(state: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def show_keys(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > SHOW_KEYS else ""
    return ", ".join(keys[:SHOW_KEYS]) + more


def describe(obj: Any) -> str:
    """A short description of a loaded checkpoint for error messages."""
    if isinstance(obj, CanonicalCheckpoint):
        return f"a seed_distill file with {len(obj.tensors)} tensors"
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj]
        kind = "tensors" if is_state_dict(obj) else "entries"
        return f"a mapping of {len(keys)} {kind}; first keys: {keys[:8]}"
    return f"an object of type {type(obj).__name__}"


def split_state(state: Mapping[str, torch.Tensor], fmt: str, *, prefix: str, head: str | None,
           drop: tuple[str, ...] = ()) -> Extracted:
    """Sort `state` keys into backbone (under `prefix`), head (under `prefix + head`) and the
    dropped ones; any other key is an error, so nothing is lost silently."""
    backbone: dict[str, torch.Tensor] = {}
    head_state: dict[str, torch.Tensor] = {}
    dropped: dict[str, int] = {}
    stray: list[str] = []
    for key, value in state.items():
        pattern = next((p for p in drop if key == p or key.startswith(p)), None)
        if pattern is not None:
            dropped[pattern] = dropped.get(pattern, 0) + 1
        elif key.startswith(prefix):
            rest = key[len(prefix):]
            if head is not None and rest.startswith(head):
                head_state[rest[len(head):]] = value
            else:
                backbone[rest] = value
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(
            f"format {fmt}: {len(stray)} keys are neither under '{prefix}' nor known extras "
            f"to drop ({', '.join(drop) or 'none'}): {show_keys(stray)}")
    if not backbone:
        raise CheckpointError(f"format {fmt}: no backbone keys under '{prefix}'")
    return Extracted(backbone=backbone, head=head_state, dropped=dropped)


def split_with_head(state: Mapping[str, torch.Tensor], fmt: str, prefix: str, head: str,
               drop: tuple[str, ...]) -> Extracted:
    """Split where the head sits beside the backbone (`projector.*`) rather than under it."""
    out = split_state(state, fmt, prefix="", head=head, drop=drop)
    stray = [k for k in out.backbone if not k.startswith(prefix)]
    if stray:
        raise CheckpointError(f"format {fmt}: keys outside '{prefix}' and '{head}' that are not "
                              f"known extras ({', '.join(drop)}): {show_keys(stray)}")
    out.backbone = {k[len(prefix):]: v for k, v in out.backbone.items()}
    return out


def need_state(value: Any, fmt: str, what: str, obj: Any) -> Any:
    if not is_state_dict(value):
        raise CheckpointError(f"not a {fmt} checkpoint: expected {what}; got {describe(obj)}")
    return value



def meta_state(module_fn: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    """State dict (shapes, dtypes) of a module built on the meta device: no memory, no init."""
    with torch.device("meta"):
        return module_fn().state_dict()


def fit_state(got: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str,
         hint: str) -> dict[str, torch.Tensor]:
    """`got` checked key by key against `expected`; missing BN counters are filled with 0.

    Returns tensors in `expected`'s order and dtypes (floating ones as float32).
    """
    for key, ref in expected.items():
        if key not in got and key.endswith("num_batches_tracked"):
            got[key] = torch.zeros((), dtype=ref.dtype)  # older checkpoints lack the counter
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [k for k in expected if k in got and tuple(got[k].shape) != tuple(
        expected[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {show_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {show_keys(unexpected)}")
        if mismatched:
            shown = [f"{k} checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
                     for k in sorted(mismatched)[:SHOW_KEYS]]
            more = f" ({len(mismatched)} in all)" if len(mismatched) > SHOW_KEYS else ""
            parts.append(f"{len(mismatched)} shape mismatches: {'; '.join(shown)}{more}")
        raise CheckpointError(f"{what}: " + "; ".join(parts) + f". {hint}")
    out = {}
    for key, ref in expected.items():
        value = got[key]
        if value.is_floating_point():
            value = value.float()
        elif value.dtype != ref.dtype:
            value = value.to(ref.dtype)
        out[key] = value
    return out


def stem_kernel(state: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    weight = state.get("conv1.weight")
    return tuple(weight.shape[-2:]) if weight is not None and weight.dim() == 4 else None


