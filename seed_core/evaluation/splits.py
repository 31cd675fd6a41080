"""The class-balanced holdout split carved out of train for choosing hyper-parameters, so the
test split is scored once, and where a chosen value sits in its grid."""

from __future__ import annotations

from typing import Sequence

import torch


def holdout_split(labels: torch.Tensor, fraction: float,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample positions into (fit, holdout), class-balanced and deterministic.

    Each class with n >= 2 samples gives round(fraction * n) of them (at least 1, at most n - 1)
    to the holdout; a class with one sample stays in fit. The two sorted index tensors are
    disjoint and together cover `range(len(labels))`.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    held: list[torch.Tensor] = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        n = members.numel()
        take = 0 if n < 2 else min(n - 1, max(1, round(fraction * n)))
        held.append(members[torch.randperm(n, generator=generator)[:take]])
    holdout = torch.sort(torch.cat(held)).values if held else torch.empty(0, dtype=torch.long)
    mask = torch.ones(labels.shape[0], dtype=torch.bool)
    mask[holdout] = False
    return torch.nonzero(mask).flatten(), holdout




def grid_edge(value: float, grid: Sequence[float]) -> str | None:
    """Where a value chosen on the holdout sits in its grid: "lowest" or "highest" at an end of a
    grid of two or more values (the optimum may lie beyond it), else None."""
    values = sorted(set(grid))
    if len(values) < 2 or value not in values:
        return None
    if value == values[0]:
        return "lowest"
    if value == values[-1]:
        return "highest"
    return None
