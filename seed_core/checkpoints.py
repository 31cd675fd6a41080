"""Teacher checkpoints: every known layout, converted strictly to one canonical form.

Canonical form (format `seed_distill`): `X.safetensors` holding `backbone.*` tensors (they load
with `strict=True` into `create_backbone(arch, small_images)`) and `head.*` tensors (the keys of
`build_head(head_layout)`), plus `X.json`, a sidecar with the metadata; the same JSON is stored
in the safetensors header under the key `seed_distill`, so a lone file describes itself:

    {"format": "moco_v2",            # layout of the *source* checkpoint
     "schema": 1,
     "arch": "resnet50", "small_images": false,
     "feature_dim": 2048, "embed_dim": 128,
     "head": true, "head_layout": [["linear", 2048, 2048, true], ["relu"], ...] | null,
     "source_sha256": "...", "source_path": "...",
     "dropped": {"encoder_k.": 320, "queue": 1, ...}}

Source layouts are recognised from the checkpoint's own keys (see `known_formats()`); each has
a small `detect` predicate and an `extract` function returning the backbone and head tensors
with their prefixes removed. Conversion is strict: a key the arch does not expect, a key it
lacks, or a shape that differs is an error naming the keys; nothing is ever loaded
partially (every `load_state_dict` is strict). Heads are rebuilt from their keys and shapes (see `infer_head_layout`).

Small-image stems: when `small_images` is not given, a ResNet checkpoint whose `conv1` is 3x3
while the arch's stem is 7x7 is taken as a CIFAR-style stem (3x3 stride 1, no max-pool) and
`small_images: true` is recorded. A stride cannot be read from weights, so deep 3x3 stems and
EfficientNet / MobileNet stems are never auto-detected: pass `small_images=True` for those.

Also: BatchNorm counters (`num_batches_tracked`) missing from old or converted checkpoints are
filled with 0; floating tensors are stored as float32; `argparse.Namespace` (DINO's `args`) is
the only class unpickled beyond torch's weights-only defaults. Known limits: solo-learn's CIFAR
stem pads its 3x3 conv by 2 where ours pads by 1 (same weights, slightly different border
features); heads with weight-normalised or parameter-free layers other than one activation
between layers are not inferred; SEED's EfficientNet students (lukemelas key names) do not map
onto timm's.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from seed_core.io import atomic_path, write_json
from seed_core.models import (Encoder, Layout, build_head, classifier_prefixes, create_backbone,
                              known_arch, layout_out_dim)

log = logging.getLogger(__name__)

CANONICAL = "seed_distill"
SCHEMA = 1
META_KEY = "seed_distill"  # key of the JSON metadata in the safetensors header
CANONICAL_NAMES = ("teacher.safetensors", "model.safetensors")
REQUIRED_META = ("format", "arch", "small_images", "feature_dim", "embed_dim", "head",
                 "head_layout")
_SHOW = 5  # offending keys named in an error


class CheckpointError(ValueError):
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


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _unwrap_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DistributedDataParallel's `module.` when every key carries it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _has_prefix(state: Mapping[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def _show(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def describe(obj: Any) -> str:
    """A short description of a loaded checkpoint for error messages."""
    if isinstance(obj, CanonicalCheckpoint):
        return f"a seed_distill file with {len(obj.tensors)} tensors"
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj]
        kind = "tensors" if _is_state_dict(obj) else "entries"
        return f"a mapping of {len(keys)} {kind}; first keys: {keys[:8]}"
    return f"an object of type {type(obj).__name__}"


def _split(state: Mapping[str, torch.Tensor], fmt: str, *, prefix: str, head: str | None,
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
            f"to drop ({', '.join(drop) or 'none'}): {_show(stray)}")
    if not backbone:
        raise CheckpointError(f"format {fmt}: no backbone keys under '{prefix}'")
    return Extracted(backbone=backbone, head=head_state, dropped=dropped)


def _with_head(state: Mapping[str, torch.Tensor], fmt: str, prefix: str, head: str,
               drop: tuple[str, ...]) -> Extracted:
    """Split where the head sits beside the backbone (`projector.*`) rather than under it."""
    out = _split(state, fmt, prefix="", head=head, drop=drop)
    stray = [k for k in out.backbone if not k.startswith(prefix)]
    if stray:
        raise CheckpointError(f"format {fmt}: keys outside '{prefix}' and '{head}' that are not "
                              f"known extras ({', '.join(drop)}): {_show(stray)}")
    out.backbone = {k[len(prefix):]: v for k, v in out.backbone.items()}
    return out


def _need(value: Any, fmt: str, what: str, obj: Any) -> Any:
    if not _is_state_dict(value):
        raise CheckpointError(f"not a {fmt} checkpoint: expected {what}; got {describe(obj)}")
    return value


# ----------------------------------------------------------------------------- formats
# Each pair: `_detect_X(obj) -> bool` looks only at keys; `_extract_X(obj) -> Extracted`.


def _canonical_state(obj: Any) -> Mapping[str, torch.Tensor] | None:
    state = obj.tensors if isinstance(obj, CanonicalCheckpoint) else obj
    if not _is_state_dict(state):
        return None
    if not all(re.match(r"backbone\.|head\.\d", k) for k in state):
        return None
    return state if _has_prefix(state, "backbone.") else None


def _detect_seed_distill(obj: Any) -> bool:
    return _canonical_state(obj) is not None


def _extract_seed_distill(obj: Any) -> Extracted:
    state = _canonical_state(obj)
    if state is None:
        raise CheckpointError("not a seed_distill checkpoint: expected only 'backbone.*' and "
                              f"'head.<index>.*' tensors; got {describe(obj)}")
    return Extracted(
        backbone={k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
        head={k[len("head."):]: v for k, v in state.items() if k.startswith("head.")},
        meta=obj.meta if isinstance(obj, CanonicalCheckpoint) else None)


def _dino_state(obj: Any) -> Mapping[str, torch.Tensor] | None:
    state = obj.get("teacher") if isinstance(obj, Mapping) else None
    if state is None and _is_state_dict(obj):
        state = obj  # the teacher's state dict saved on its own
    if not _is_state_dict(state):
        return None
    state = _unwrap_module(state)
    if _has_prefix(state, "backbone.") and (_has_prefix(state, "head.mlp.")
                                            or _has_prefix(state, "head.last_layer.")):
        return state
    return None


def _detect_dino(obj: Any) -> bool:
    return _dino_state(obj) is not None


def _extract_dino(obj: Any) -> Extracted:
    state = _dino_state(obj)
    if state is None:
        raise CheckpointError("not a dino checkpoint: expected 'teacher' with 'backbone.*' and "
                              f"'head.mlp.*' keys; got {describe(obj)}")
    out = _with_head(state, "dino", "backbone.", "head.mlp.", ("head.last_layer.",))
    out.activation = "gelu"
    return out


def _vissl_state(obj: Any) -> Any:
    return _get(obj, "classy_state_dict", "base_model", "model", "trunk")


def _detect_vissl(obj: Any) -> bool:
    trunk = _vissl_state(obj)
    return _is_state_dict(trunk) and _has_prefix(trunk, "_feature_blocks.")


def _extract_vissl(obj: Any) -> Extracted:
    trunk = _need(_vissl_state(obj), "vissl", "'classy_state_dict.base_model.model.trunk'", obj)
    return _split(trunk, "vissl", prefix="_feature_blocks.", head=None)


def _barlow_state(obj: Any) -> dict[str, torch.Tensor] | None:
    state = _get(obj, "model")
    if not _is_state_dict(state):
        return None
    state = _unwrap_module(state)
    return state if _has_prefix(state, "backbone.") else None


def _detect_barlow_twins(obj: Any) -> bool:
    return _barlow_state(obj) is not None


def _extract_barlow_twins(obj: Any) -> Extracted:
    state = _need(_barlow_state(obj), "barlow_twins", "'model' with 'module.backbone.*' keys",
                  obj)
    # `bn` is the affine-free BatchNorm of the loss (cross-correlation), not part of the head
    return _with_head(state, "barlow_twins", "backbone.", "projector.", ("bn.",))


def _state_dict_entry(obj: Any) -> dict[str, torch.Tensor] | None:
    state = _get(obj, "state_dict")
    return _unwrap_module(state) if _is_state_dict(state) else None


def _detect_moco_v3(obj: Any) -> bool:
    state = _state_dict_entry(obj)
    return state is not None and _has_prefix(state, "base_encoder.")


def _extract_moco_v3(obj: Any) -> Extracted:
    state = _need(_state_dict_entry(obj), "moco_v3",
                  "'state_dict' with 'module.base_encoder.*' keys", obj)
    return _split(state, "moco_v3", prefix="base_encoder.", head="fc.",
                  drop=("momentum_encoder.", "predictor."))


def _detect_moco_v2(obj: Any) -> bool:
    state = _state_dict_entry(obj)
    return state is not None and "encoder_q.fc.0.weight" in state


def _detect_moco_v1(obj: Any) -> bool:
    state = _state_dict_entry(obj)
    return (state is not None and _has_prefix(state, "encoder_q.")
            and "encoder_q.fc.0.weight" not in state)


def _extract_moco(fmt: str) -> Callable[[Any], Extracted]:
    def extract(obj: Any) -> Extracted:
        state = _need(_state_dict_entry(obj), fmt,
                      "'state_dict' with 'module.encoder_q.*' keys", obj)
        return _split(state, fmt, prefix="encoder_q.", head="fc.",
                      drop=("encoder_k.", "queue_ptr", "queue"))
    return extract


def _detect_seed(obj: Any) -> bool:
    state = _state_dict_entry(obj)
    return state is not None and _has_prefix(state, "student.")


def _extract_seed(obj: Any) -> Extracted:
    state = _need(_state_dict_entry(obj), "seed", "'state_dict' with 'module.student.*' keys",
                  obj)
    return _split(state, "seed", prefix="student.", head="fc.",
                  drop=("teacher.", "queue_ptr", "queue"))


SOLO_EXTRAS = ("momentum_", "classifier.", "queue", "predictor.", "prototypes", "head.",
               "local_memory_")


def _solo_state(obj: Any) -> Mapping[str, torch.Tensor] | None:
    state = _get(obj, "state_dict")
    if _is_state_dict(state) and _has_prefix(state, "backbone."):
        return state
    return None


def _detect_solo_learn(obj: Any) -> bool:
    return _solo_state(obj) is not None


def _extract_solo_learn(obj: Any) -> Extracted:
    state = _need(_solo_state(obj), "solo_learn", "'state_dict' with 'backbone.*' keys", obj)
    return _with_head(state, "solo_learn", "backbone.", "projector.", SOLO_EXTRAS)


def _swav_state(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The released files are a plain `module.*` state dict; training checkpoints nest it
    under 'state_dict'."""
    for state in (obj, _get(obj, "state_dict")):
        if not _is_state_dict(state):
            continue
        plain = _unwrap_module(state)
        if _has_prefix(plain, "projection_head") or _has_prefix(plain, "prototypes"):
            return plain
        if state is obj and all(k.startswith("module.") for k in state):
            return plain
    return None


def _detect_swav(obj: Any) -> bool:
    return _swav_state(obj) is not None


def _extract_swav(obj: Any) -> Extracted:
    state = _need(_swav_state(obj), "swav", "'module.*' keys with 'projection_head' or "
                  "'prototypes'", obj)
    # projection_head is a Sequential (projection_head.0.weight ...) or a single Linear
    return _split(state, "swav", prefix="", head="projection_head.", drop=("prototypes",))


def _detect_simclr(obj: Any) -> bool:
    state = _get(obj, "state_dict")
    return _is_state_dict(state) and not _has_prefix(state, "module.") and \
        any(k.startswith(("conv1", "conv_stem")) for k in state)


def _extract_simclr(obj: Any) -> Extracted:
    state = _need(_get(obj, "state_dict"), "simclr", "'state_dict' with plain keys", obj)
    out = _split(state, "simclr", prefix="", head=None)
    out.drop_classifier = True
    return out


def _detect_torchvision(obj: Any) -> bool:
    return _is_state_dict(obj) and not all(k.startswith("module.") for k in obj)


def _extract_torchvision(obj: Any) -> Extracted:
    state = _need(obj if _is_state_dict(obj) else None, "torchvision",
                  "a plain state dict of tensors", obj)
    out = _split(state, "torchvision", prefix="", head=None)
    out.drop_classifier = True
    return out


# detection order: most specific first; `torchvision` (any plain state dict) comes last
_FORMATS = [
    TeacherFormat("seed_distill", "this project's canonical safetensors (backbone.*, head.N.*)",
                  _detect_seed_distill, _extract_seed_distill),
    TeacherFormat("dino", "DINO full checkpoint: 'teacher', module.backbone.*, head.mlp.*",
                  _detect_dino, _extract_dino),
    TeacherFormat("vissl", "VISSL: classy_state_dict.base_model.model.trunk._feature_blocks.*",
                  _detect_vissl, _extract_vissl),
    TeacherFormat("barlow_twins", "Barlow Twins: 'model', module.backbone.*, module.projector.*",
                  _detect_barlow_twins, _extract_barlow_twins),
    TeacherFormat("moco_v3", "MoCo v3: 'state_dict', module.base_encoder.* (BN-MLP fc)",
                  _detect_moco_v3, _extract_moco_v3),
    TeacherFormat("moco_v2", "MoCo v2: 'state_dict', module.encoder_q.* (MLP fc.0/fc.2)",
                  _detect_moco_v2, _extract_moco("moco_v2")),
    TeacherFormat("moco_v1", "MoCo v1: 'state_dict', module.encoder_q.* (Linear fc)",
                  _detect_moco_v1, _extract_moco("moco_v1")),
    TeacherFormat("seed", "SEED student: 'state_dict', module.student.* (fc MLP)",
                  _detect_seed, _extract_seed),
    TeacherFormat("solo_learn", "solo-learn Lightning .ckpt: 'state_dict', backbone.*, "
                  "projector.*", _detect_solo_learn, _extract_solo_learn),
    TeacherFormat("swav", "SWAV: module.* with projection_head.*, prototypes*",
                  _detect_swav, _extract_swav),
    TeacherFormat("simclr", "SimCLR converted release: 'state_dict' with plain keys",
                  _detect_simclr, _extract_simclr),
    TeacherFormat("torchvision", "plain torchvision / timm state dict (classifier dropped)",
                  _detect_torchvision, _extract_torchvision),
]
FORMATS: dict[str, TeacherFormat] = {f.name: f for f in _FORMATS}


def known_formats() -> list[str]:
    """Format names in detection order."""
    return list(FORMATS)


def detect_format(obj: Any) -> str:
    """The first format whose `detect` accepts `obj`; an error lists the known formats."""
    for fmt in _FORMATS:
        if fmt.detect(obj):
            return fmt.name
    raise CheckpointError(f"unrecognised checkpoint layout ({describe(obj)}); known formats: "
                          f"{', '.join(known_formats())}. If it holds weights under other keys, "
                          "save that state dict on its own (torch.save(ckpt['KEY'], 'plain.pth')) "
                          "and pass the plain file")


# ----------------------------------------------------------------------------- heads


def infer_head_layout(head_state: Mapping[str, torch.Tensor], activation: str = "relu"
                      ) -> tuple[Layout | None, dict[str, torch.Tensor]]:
    """Rebuild a head's layout from its keys and shapes and re-index its tensors.

    Keys are `{index}.{param}` of a numbered Sequential (or bare `weight`/`bias` of a single
    Linear). A layer with `running_mean` is a BatchNorm1d (affine when it has a weight), a 2-D
    weight is a Linear; each one-index gap between parametrised layers is an `activation`.

    Returns:
        (layout or None when there is no head, tensors keyed by our Sequential's indices)
    """
    if not head_state:
        return None, {}
    groups: dict[int, dict[str, torch.Tensor]] = {}
    bare = [k for k in head_state if "." not in k]
    if bare and len(bare) != len(head_state):
        raise CheckpointError(f"head: mixes bare keys ({_show(bare)}) with indexed ones")
    for key, value in head_state.items():
        index, _, param = (f"0.{key}" if bare else key).partition(".")
        if not index.isdigit() or param not in ("weight", "bias", "running_mean", "running_var",
                                                "num_batches_tracked"):
            raise CheckpointError(f"head: cannot read key '{key}' (supported: Linear and "
                                  "BatchNorm1d layers of a numbered Sequential)")
        groups.setdefault(int(index), {})[param] = value
    layout: Layout = []
    state: dict[str, torch.Tensor] = {}
    previous = -1
    for index in sorted(groups):
        gap = index - previous - 1
        if gap == 1 and previous >= 0:
            layout.append([activation])
        elif gap != 0:
            raise CheckpointError(f"head: cannot infer the {gap} parameter-free layers before "
                                  f"index {index} (only a single activation between layers)")
        params = groups[index]
        position = len(layout)
        if "running_mean" in params:
            affine = "weight" in params
            layout.append(["bn", int(params["running_mean"].shape[0]), affine])
        elif "weight" in params and params["weight"].dim() == 2:
            out_dim, in_dim = params["weight"].shape
            layout.append(["linear", int(in_dim), int(out_dim), "bias" in params])
        else:
            raise CheckpointError(f"head: layer {index} with {sorted(params)} is neither a "
                                  "Linear nor a BatchNorm1d")
        for param, value in params.items():
            state[f"{position}.{param}"] = value
        previous = index
    return layout, state


# ----------------------------------------------------------------------------- conversion


def _meta_state(module_fn: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    """State dict (shapes, dtypes) of a module built on the meta device: no memory, no init."""
    with torch.device("meta"):
        return module_fn().state_dict()


def _fit(got: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str,
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
            parts.append(f"{len(missing)} missing keys: {_show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_show(unexpected)}")
        if mismatched:
            shown = [f"{k} checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
                     for k in sorted(mismatched)[:_SHOW]]
            more = f" ({len(mismatched)} in all)" if len(mismatched) > _SHOW else ""
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


def _stem_kernel(state: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    weight = state.get("conv1.weight")
    return tuple(weight.shape[-2:]) if weight is not None and weight.dim() == 4 else None


def _resolve_small_images(arch: str, backbone: Mapping[str, torch.Tensor],
                          requested: bool | None, stored: dict[str, Any] | None) -> bool:
    if stored is not None and "small_images" in stored:
        if requested is not None and bool(requested) != bool(stored["small_images"]):
            raise CheckpointError(f"small_images={requested} was asked for, but the checkpoint "
                                  f"records small_images={stored['small_images']}")
        return bool(stored["small_images"])
    if requested is not None:
        return bool(requested)
    expected = _meta_state(lambda: create_backbone(arch))
    if _stem_kernel(expected) == (7, 7) and _stem_kernel(backbone) == (3, 3):
        log.info("conv1 is 3x3 where %s has 7x7: a small-image (CIFAR-style) stem", arch)
        return True
    return False


def convert_checkpoint(obj: Any, arch: str, fmt: str = "auto", small_images: bool | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Canonical backbone and head tensors of a loaded checkpoint, checked strictly.

    Args:
        obj: what `load_untrusted` returned.
        arch: the backbone architecture the checkpoint was trained with.
        fmt: "auto" (detect from the keys) or a name from `known_formats()`.
        small_images: force the stride-1 stem on or off; None = recorded / auto-detected.

    Returns:
        (backbone_state, head_state, meta) ready for `save_canonical`; `source_sha256` and
        `source_path` are left None for the caller who knows the file.
    """
    if not known_arch(arch):
        try:
            create_backbone(arch)
        except ValueError as err:  # its message lists known architectures
            raise CheckpointError(str(err)) from None
    forced = fmt != "auto"
    if forced and fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; known formats: "
                              f"{', '.join(known_formats())} (or auto)")
    name = fmt if forced else detect_format(obj)
    try:
        return _convert(obj, arch, name, small_images)
    except CheckpointError as err:
        if not forced:
            raise
        try:
            guess = f"auto-detection says {detect_format(obj)}"
        except CheckpointError:
            guess = "auto-detection recognises no format"
        raise CheckpointError(f"{err} (format {name} was forced; {guess})") from None


PROVENANCE_KEYS = ("method", "epochs", "teacher_arch", "teacher_format")


def _convert(obj: Any, arch: str, name: str, small_images: bool | None
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    extracted = FORMATS[name].extract(obj)
    stored = extracted.meta
    if stored is not None and stored.get("arch") not in (None, arch):
        raise CheckpointError(f"the checkpoint records arch {stored['arch']!r}, not {arch!r}; "
                              f"pass --arch {stored['arch']}")
    backbone = dict(extracted.backbone)
    small = _resolve_small_images(arch, backbone, small_images, stored)
    expected = _meta_state(lambda: create_backbone(arch, small))
    dropped = dict(extracted.dropped)
    if extracted.drop_classifier:
        with torch.device("meta"):
            prefixes = classifier_prefixes(create_backbone(arch, small))
        for key in [k for k in backbone if k.startswith(prefixes) and k not in expected]:
            del backbone[key]
            pattern = next(p for p in prefixes if key.startswith(p))
            dropped[pattern] = dropped.get(pattern, 0) + 1
    hint = (f"The checkpoint does not fit arch {arch!r} (small_images={small}, format {name}); "
            "pass the --arch it was trained with")
    if _stem_kernel(backbone) == (3, 3) and _stem_kernel(expected) == (7, 7):
        hint += " (its 3x3 conv1 suggests --small-images)"
    backbone = _fit(backbone, expected, f"backbone of arch {arch!r}", hint)
    with torch.device("meta"):
        feature_dim = int(create_backbone(arch, small).num_features)

    if stored is not None and stored.get("head_layout") is not None:
        layout = [list(entry) for entry in stored["head_layout"]]
        head_state = dict(extracted.head)
    else:
        layout, head_state = infer_head_layout(extracted.head, extracted.activation)
    embed_dim = feature_dim
    if layout is not None:
        try:
            embed_dim = layout_out_dim(layout, feature_dim)
            head_expected = _meta_state(lambda: build_head(layout))
        except ValueError as err:
            raise CheckpointError(f"head does not fit arch {arch!r} (features {feature_dim}): "
                                  f"{err}") from None
        head_state = _fit(head_state, head_expected, "head", f"Inferred layout: {layout}")
    elif head_state:
        raise CheckpointError(f"head tensors without a layout: {_show(list(head_state))}")
    meta = {"format": name, "schema": SCHEMA, "arch": arch, "small_images": small,
            "feature_dim": feature_dim, "embed_dim": embed_dim, "head": layout is not None,
            "head_layout": layout, "source_sha256": None, "source_path": None,
            "dropped": dropped}
    # how our own models were trained travels with them (the report's method/epochs columns)
    meta.update({k: stored[k] for k in PROVENANCE_KEYS if stored and k in stored})
    return backbone, head_state, meta


# ----------------------------------------------------------------------------- files


def load_untrusted(path: str | Path) -> Any:
    """Read a checkpoint without ever running code from it.

    `.safetensors` files are read with safetensors (our own files come back as a
    `CanonicalCheckpoint`); anything else goes through `torch.load(weights_only=True)`, which
    refuses pickles that reference arbitrary callables. `argparse.Namespace` (DINO stores its
    arguments) is the only class allowed beyond torch's defaults.
    """
    path = Path(path)
    if path.is_dir():
        path = resolve_canonical_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: (GLOBAL \S+)|Unsupported operand \S+", str(err))
        what = f" (it references {found.group(1) or found.group(0)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: unpickling it needs arbitrary code{what}. Nothing from the file "
            "was executed. Only if you trust where it comes from: unpickle it yourself in an "
            "isolated environment, save its tensors alone (e.g. "
            "`torch.save(ckpt['state_dict'], 'clean.pth')` or safetensors' save_file), then "
            "pass the clean file") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {err}") from None


def _read_safetensors(path: Path) -> Any:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None
    if META_KEY in header:
        return CanonicalCheckpoint(tensors=tensors, meta=json.loads(header[META_KEY]))
    return tensors


def resolve_canonical_file(path: str | Path) -> Path:
    """`path` itself, or the one `teacher.safetensors` / `model.safetensors` in a directory."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = [path / name for name in CANONICAL_NAMES if (path / name).is_file()]
    if not found:
        found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise CheckpointError(f"{path}: expected exactly one of {', '.join(CANONICAL_NAMES)} "
                              f"in the directory, found {[p.name for p in found]}")
    return found[0]


def _paths(path_stem_or_file: str | Path) -> tuple[Path, Path]:
    path = Path(path_stem_or_file)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def canonicalise(backbone_state: Mapping[str, torch.Tensor],
                 head_state: Mapping[str, torch.Tensor] | None, meta: Mapping[str, Any]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata checked against each other, with the derived fields filled in.

    `meta` needs `format` and `arch`; `small_images` defaults to False, `head_layout` is
    inferred from the head's keys (ReLU between layers) when absent, and `feature_dim`,
    `embed_dim`, `head` are computed. The tensors must fit the arch and head strictly, so a file
    that `save_canonical` wrote always loads.

    Returns:
        (backbone, head, meta): tensors in the model's key order, floating ones as float32.
    """
    missing = [k for k in ("format", "arch") if not meta.get(k)]
    if missing:
        raise ValueError(f"canonical metadata lacks {missing}")
    out = {"schema": SCHEMA, **dict(meta)}
    arch, small = out["arch"], bool(out.get("small_images", False))
    out["small_images"] = small
    backbone = _fit(dict(backbone_state), _meta_state(lambda: create_backbone(arch, small)),
                    f"backbone of arch {arch!r}", "The tensors do not fit the arch the "
                    "metadata names")
    with torch.device("meta"):
        feature_dim = int(create_backbone(arch, small).num_features)
    layout = out.get("head_layout")
    if layout is None and head_state:
        layout, head_state = infer_head_layout(head_state)
    head: dict[str, torch.Tensor] = {}
    if layout is not None:
        head = _fit(dict(head_state or {}), _meta_state(lambda: build_head(layout)), "head",
                    f"The head tensors do not fit head_layout {layout}")
    out.update(feature_dim=feature_dim, head=layout is not None, head_layout=layout,
               embed_dim=layout_out_dim(layout, feature_dim) if layout else feature_dim)
    out.setdefault("source_sha256", None)
    out.setdefault("source_path", None)
    return backbone, head, out


def save_canonical(path_stem_or_file: str | Path, backbone_state: Mapping[str, torch.Tensor],
                   head_state: Mapping[str, torch.Tensor] | None, meta: Mapping[str, Any]
                   ) -> Path:
    """Write `X.safetensors` (metadata in its header) and the `X.json` sidecar, atomically.

    `meta` needs `format` and `arch`; the rest is completed and checked by `canonicalise`.

    Returns:
        the `.safetensors` path.
    """
    backbone_state, head_state, meta = canonicalise(backbone_state, head_state, meta)
    tensors_path, json_path = _paths(path_stem_or_file)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, state in (("backbone.", backbone_state), ("head.", head_state)):
        for key, value in state.items():
            value = value.detach().to("cpu").contiguous()
            if value.numel() and value.data_ptr() in seen:
                value = value.clone()  # safetensors refuses tensors that share memory
            if value.numel():
                seen.add(value.data_ptr())
            tensors[prefix + key] = value
    with atomic_path(tensors_path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    write_json(json_path, meta)
    return tensors_path


def read_canonical_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a canonical file (header first, else its JSON sidecar)."""
    file = resolve_canonical_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:
        raise CheckpointError(f"{file}: not a readable safetensors file: {err}") from None
    if META_KEY in header:
        return json.loads(header[META_KEY])
    sidecar = _paths(file)[1]
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    raise CheckpointError(f"{file}: not a seed_distill file (no '{META_KEY}' header metadata "
                          f"and no {sidecar.name} beside it); convert it with stages/teacher.py")


def encoder_from_states(backbone_state: Mapping[str, torch.Tensor],
                        head_state: Mapping[str, torch.Tensor] | None, meta: Mapping[str, Any],
                        where: str = "checkpoint") -> Encoder:
    """Build the encoder `meta` describes and load the tensors with strict=True."""
    backbone = create_backbone(meta["arch"], bool(meta["small_images"]))
    head = build_head(meta["head_layout"]) if meta.get("head") else None
    try:
        backbone.load_state_dict(dict(backbone_state), strict=True)
        if head is not None:
            head.load_state_dict(dict(head_state or {}), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{where}: does not load into {meta['arch']}: {err}") from None
    if head is None and head_state:
        raise CheckpointError(f"{where}: has head tensors but its metadata says head=false")
    return Encoder(backbone, head)


def load_canonical(path: str | Path, device: str | torch.device = "cpu"
                   ) -> tuple[Encoder, dict[str, Any]]:
    """Load a canonical file (or a directory holding one) strictly, in eval mode on `device`."""
    file = resolve_canonical_file(path)
    meta = read_canonical_meta(file)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{file}: metadata lacks {missing}")
    tensors = load_file(str(file))
    stray = [k for k in tensors if not k.startswith(("backbone.", "head."))]
    if stray:
        raise CheckpointError(f"{file}: keys outside backbone.* / head.*: {_show(stray)}")
    backbone_state = {k[len("backbone."):]: v for k, v in tensors.items()
                      if k.startswith("backbone.")}
    head_state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    encoder = encoder_from_states(backbone_state, head_state, meta, where=str(file))
    return encoder.to(device).eval(), meta


def save_encoder(path_stem_or_file: str | Path, encoder: Encoder, fmt: str = CANONICAL,
                 **extra: Any) -> Path:
    """Save an encoder built by `create_backbone` / `build_head` in canonical form."""
    backbone, head = encoder.backbone, encoder.head
    meta = {"format": fmt, "arch": backbone.arch_name, "small_images": backbone.small_images,
            "head_layout": getattr(head, "layout", None) if head is not None else None, **extra}
    return save_canonical(path_stem_or_file, backbone.state_dict(),
                          head.state_dict() if head is not None else {}, meta)
