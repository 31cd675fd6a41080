"""Any supported checkpoint -> canonical backbone and head tensors, checked strictly against the
architecture (see `seed_core.teachers` for the canonical form)."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from seed_core.models.backbones import classifier_prefixes, create_backbone, known_arch
from seed_core.models.heads import build_head, layout_out_dim
from seed_core.teachers.common import (SCHEMA, CheckpointError, fit_state, meta_state,
                                       show_keys, stem_kernel)
from seed_core.teachers.formats import FORMATS, detect_format, known_formats
from seed_core.teachers.heads import infer_head_layout

log = logging.getLogger(__name__)


def _resolve_small_images(arch: str, backbone: Mapping[str, torch.Tensor],
                          requested: bool | None, stored: dict[str, Any] | None) -> bool:
    if stored is not None and "small_images" in stored:
        if requested is not None and bool(requested) != bool(stored["small_images"]):
            raise CheckpointError(f"small_images={requested} was asked for, but the checkpoint "
                                  f"records small_images={stored['small_images']}")
        return bool(stored["small_images"])
    if requested is not None:
        return bool(requested)
    expected = meta_state(lambda: create_backbone(arch))
    if stem_kernel(expected) == (7, 7) and stem_kernel(backbone) == (3, 3):
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
    expected = meta_state(lambda: create_backbone(arch, small))
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
    if stem_kernel(backbone) == (3, 3) and stem_kernel(expected) == (7, 7):
        hint += " (its 3x3 conv1 suggests --small-images)"
    backbone = fit_state(backbone, expected, f"backbone of arch {arch!r}", hint)
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
            head_expected = meta_state(lambda: build_head(layout))
        except ValueError as err:
            raise CheckpointError(f"head does not fit arch {arch!r} (features {feature_dim}): "
                                  f"{err}") from None
        head_state = fit_state(head_state, head_expected, "head", f"Inferred layout: {layout}")
    elif head_state:
        raise CheckpointError(f"head tensors without a layout: {show_keys(list(head_state))}")
    meta = {"format": name, "schema": SCHEMA, "arch": arch, "small_images": small,
            "feature_dim": feature_dim, "embed_dim": embed_dim, "head": layout is not None,
            "head_layout": layout, "source_sha256": None, "source_path": None,
            "dropped": dropped}
    # how our own models were trained travels with them (the report's method/epochs columns)
    meta.update({k: stored[k] for k in PROVENANCE_KEYS if stored and k in stored})
    return backbone, head_state, meta


