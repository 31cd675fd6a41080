"""Accuracy metrics of class scores and predictions (percent)."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")



def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """`{"top1": %, "top5": %}` from scores `(N, C)`; k is clamped to C (top-5 of 3 classes
    counts every sample as correct)."""
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows but {labels.shape[0]} labels")
    if scores.shape[0] == 0:
        raise ValueError("no samples to score")
    labels = labels.to(scores.device)
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    # a count over N, divided once: 83.29, not the 83.28999999999999 of a mean times 100
    return {f"top{k}": 100.0 * int(hits[:, :k].any(dim=1).sum()) / hits.shape[0] for k in ks}


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor,
                       num_classes: int) -> torch.Tensor:
    """Top-1 accuracy in percent per class `(C,)`; NaN for a class without samples."""
    labels = labels.to(pred.device)
    total = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    out = 100.0 * correct / total
    return out.float()


def nan_to_none(values: torch.Tensor) -> list[float | None]:
    """A JSON-safe list: NaN (class without samples) becomes None."""
    return [None if math.isnan(v) else round(v, 4) for v in values.tolist()]


