"""Per-sample test predictions (`index`, `label`, `prediction`, int64 `(N,)` each, safetensors),
written by the kNN and linear stages so the report can pair two models on the same images."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seed_core.io import atomic_path

PREDICTION_KEYS = ("index", "label", "prediction")


def save_predictions(path: str | Path, index: torch.Tensor, labels: torch.Tensor,
                     predictions: torch.Tensor, metadata: Mapping[str, str] | None = None) -> None:
    """Write the predictions atomically; rows are sorted by sample index."""
    if not index.shape == labels.shape == predictions.shape or index.ndim != 1:
        raise ValueError(f"{path}: index {tuple(index.shape)}, labels {tuple(labels.shape)} and "
                         f"predictions {tuple(predictions.shape)} must be equal 1-D shapes")
    order = torch.argsort(index.cpu())
    tensors = {"index": index.cpu()[order], "label": labels.cpu()[order],
               "prediction": predictions.cpu()[order]}
    tensors = {k: v.to(torch.int64).contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))


def load_predictions(path: str | Path) -> dict[str, torch.Tensor]:
    """`{"index", "label", "prediction"}` from a predictions file, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions file; run the kNN / linear stage with "
                                f"--predictions {path}")
    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: not a safetensors predictions file ({err})") from None
    missing = [k for k in PREDICTION_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing} (has {sorted(tensors)})")
    n = tensors["index"].shape[0]
    if any(tensors[k].shape != (n,) for k in PREDICTION_KEYS):
        raise ValueError(f"{path}: index, label and prediction must be (N,) vectors of one N, got "
                         + ", ".join(f"{k} {tuple(tensors[k].shape)}" for k in PREDICTION_KEYS))
    return tensors


def paired_correctness(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                       where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample correctness `(N,)` bool of two models, checked to be on the same samples."""
    if not torch.equal(a["index"], b["index"]):
        raise ValueError(f"{where}: the two prediction files cover different samples "
                         f"({a['index'].numel()} vs {b['index'].numel()}); evaluate both models "
                         f"on the same val shards")
    if not torch.equal(a["label"], b["label"]):
        raise ValueError(f"{where}: the two prediction files disagree on the labels of the same "
                         f"samples; they were made from different val shards")
    return a["prediction"] == a["label"], b["prediction"] == b["label"]
