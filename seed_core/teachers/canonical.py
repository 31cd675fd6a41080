"""The canonical model file (format `seed_distill`) that every stage reads and writes: a
`.safetensors` of `backbone.*` and `head.*` tensors with its metadata in the header, plus a JSON
sidecar. Written atomically; loaded strictly (every `load_state_dict` is strict)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seed_core.io import atomic_path, write_json
from seed_core.models.backbones import create_backbone
from seed_core.models.encoder import Encoder
from seed_core.models.heads import build_head, layout_out_dim
from seed_core.teachers.common import (CANONICAL, CANONICAL_NAMES, META_KEY, REQUIRED_META,
                                       SCHEMA, CheckpointError, fit_state, meta_state, show_keys)
from seed_core.teachers.heads import infer_head_layout


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
    backbone = fit_state(dict(backbone_state), meta_state(lambda: create_backbone(arch, small)),
                    f"backbone of arch {arch!r}", "The tensors do not fit the arch the "
                    "metadata names")
    with torch.device("meta"):
        feature_dim = int(create_backbone(arch, small).num_features)
    layout = out.get("head_layout")
    if layout is None and head_state:
        layout, head_state = infer_head_layout(head_state)
    head: dict[str, torch.Tensor] = {}
    if layout is not None:
        head = fit_state(dict(head_state or {}), meta_state(lambda: build_head(layout)), "head",
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
        raise CheckpointError(f"{file}: keys outside backbone.* / head.*: {show_keys(stray)}")
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
