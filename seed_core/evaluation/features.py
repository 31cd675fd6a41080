"""Frozen-model features: the extraction loop over any evaluation loader, merging parts by
sample index, and the feature files (`{split}.safetensors`: `features` (N, F), `labels` (N,),
`index` (N,)) that `stages/features.py` writes and the kNN / linear stages read."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from safetensors.torch import load_file

from seed_core.io import read_json
from seed_core.precision import autocast, to_device
from seed_core.progress import progress

FEATURE_KEYS = ("features", "labels", "index")


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[dict],
                     device: torch.device, precision: str = "fp32",
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `fn` over an evaluation loader.

    Returns:
        features `(N, F)` float32 on CPU, labels `(N,)`, global sample indices `(N,)`, sorted by
        index (this rank's share only; see `merge_by_index` to combine ranks).
    """
    feats, labels, index = [], [], []
    for batch in progress(loader, desc=desc, unit="batch"):
        with autocast(device, precision):
            out = fn(to_device(batch["image"], device))
        feats.append(out.float().cpu())
        labels.append(batch["label"])
        index.append(batch["index"])
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return merge_by_index([(torch.cat(feats), torch.cat(labels), torch.cat(index))])


def merge_by_index(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate (features, labels, index) parts and sort by index; duplicates are an error."""
    parts = [p for p in parts if p[2].numel()]
    if not parts:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    feats = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    index = torch.cat([p[2] for p in parts])
    order = torch.argsort(index)
    index = index[order]
    if index.numel() > 1 and bool((index[1:] == index[:-1]).any()):
        dup = index[1:][index[1:] == index[:-1]][:5].tolist()
        raise RuntimeError(f"sample indices seen twice while merging features: {dup}")
    return feats[order], labels[order], index


def check_feature_tensors(tensors: Mapping[str, torch.Tensor], where: str,
                          require: Sequence[str] = FEATURE_KEYS) -> None:
    """Raise naming `where` unless `tensors` hold consistent features/labels/index rows."""
    missing = [key for key in require if key not in tensors]
    if missing:
        raise ValueError(f"{where}: missing tensors {missing} (has {sorted(tensors)}); "
                         f"re-run stages/features.py")
    n = tensors["features"].shape[0]
    for key, value in tensors.items():
        if value.shape[0] != n:
            raise ValueError(f"{where}: '{key}' has {value.shape[0]} rows, 'features' has {n}")
    if tensors["features"].ndim != 2:
        raise ValueError(f"{where}: 'features' must be (N, F), "
                         f"got {tuple(tensors['features'].shape)}")


def load_feature_split(features_dir: str | Path, split: str) -> dict[str, torch.Tensor]:
    """`features_dir/{split}.safetensors` as written by stages/features.py, checked."""
    path = Path(features_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no cached features; run stages/features.py first")
    tensors = load_file(str(path))
    check_feature_tensors(tensors, str(path))
    return tensors


def feature_num_classes(features_dir: str | Path, *labels: torch.Tensor) -> int:
    """The class count recorded in `features_dir/meta.json`, else 1 + the largest label."""
    meta_path = Path(features_dir) / "meta.json"
    known = read_json(meta_path).get("num_classes") if meta_path.is_file() else None
    return int(known or max(int(lab.max()) for lab in labels if lab.numel()) + 1)


