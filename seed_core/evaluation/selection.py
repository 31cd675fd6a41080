"""Choosing the kNN hyper-parameters (k, T) on the holdout split, so the test split is scored once
with values it never influenced. The linear probe's lr is chosen the same way in `linear`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from seed_core.evaluation.knn import knn_neighbors, knn_vote
from seed_core.evaluation.splits import grid_edge

log = logging.getLogger(__name__)


def knn_grid(k: int, temperature: float, sweep_k: Sequence[int],
             sweep_temperature: Sequence[float], bank_size: int) -> tuple[list[int], list[float]]:
    """The (k, T) grid searched on the holdout: the sweeps plus the configured pair, ascending.

    A k above `bank_size` (the fit part of train, the bank of the search) would be clamped to the
    whole bank and duplicate its largest neighbour: it is left out, and the configured k must fit.
    """
    if k > bank_size:
        raise ValueError(f"knn.k = {k} exceeds the {bank_size} training samples of the holdout "
                         f"search's kNN bank; lower knn.k or use more training data")
    ks = sorted({k, *sweep_k})
    dropped = [v for v in ks if v > bank_size]
    if dropped:
        log.warning("knn.sweep_k values %s exceed the %d-sample bank of the holdout search; "
                    "left out", dropped, bank_size)
    return [v for v in ks if v <= bank_size], sorted({temperature, *sweep_temperature})


@dataclass(frozen=True)
class KnnSelection:
    """The (k, T) chosen on the holdout split and the evidence for it."""

    k: int
    temperature: float
    top1: float  # holdout top-1 (%) at (k, T)
    grid_top1: dict[tuple[int, float], float]  # holdout top-1 (%) of every (k, T) tried
    configured: tuple[int, float]  # knn.k, knn.temperature
    k_edge: str | None  # "lowest" / "highest" when k sits at an end of the k grid
    temperature_edge: str | None

    @property
    def is_configured(self) -> bool:
        return (self.k, self.temperature) == self.configured


@torch.no_grad()
def select_knn(fit_features: torch.Tensor, fit_labels: torch.Tensor,
               holdout_features: torch.Tensor, holdout_labels: torch.Tensor,
               ks: Sequence[int], temperatures: Sequence[float], configured: tuple[int, float],
               num_classes: int) -> KnnSelection:
    """Score every (k, T) of the grid on the holdout (the fit part of train as the bank) and keep
    the best top-1.

    Ties (equal numbers of correct holdout samples) go to the configured (knn.k, knn.temperature)
    when it is among them, so the selection moves away from the usual headline values only on
    evidence; otherwise to the first tied pair in grid order (smallest k, then smallest T).

    Args:
        fit_features: bank `(N, F)`; fit_labels `(N,)`.
        holdout_features: queries `(M, F)`, on the device the search should run on;
            holdout_labels `(M,)`.
        ks, temperatures: the grid (e.g. from `knn_grid`); `configured` must lie in it.
    """
    if configured[0] not in ks or configured[1] not in temperatures:
        raise ValueError(f"the configured (k, T) = {configured} is not in the grid "
                         f"k {list(ks)} x T {list(temperatures)}")
    if holdout_labels.numel() == 0:
        raise ValueError("the holdout split is empty: raise data.holdout_fraction")
    # one neighbour search for the largest k; every smaller k votes with a prefix of it
    sims, idx = knn_neighbors(fit_features, holdout_features, max(ks))
    neighbor_labels = fit_labels.to(idx.device)[idx]
    truth = holdout_labels.to(idx.device)
    correct: dict[tuple[int, float], int] = {}
    for k in ks:
        for t in temperatures:
            scores = knn_vote(sims[:, :k], neighbor_labels[:, :k], t, num_classes)
            correct[(k, t)] = int((scores.argmax(dim=1) == truth).sum())
    best = max(correct.values())
    tied = [pair for pair in correct if correct[pair] == best]  # grid order: k, then T
    chosen = configured if configured in tied else tied[0]
    n = holdout_labels.numel()
    return KnnSelection(k=chosen[0], temperature=chosen[1], top1=100.0 * best / n,
                        grid_top1={pair: 100.0 * c / n for pair, c in correct.items()},
                        configured=configured, k_edge=grid_edge(chosen[0], ks),
                        temperature_edge=grid_edge(chosen[1], temperatures))


def grid_key(k: int, temperature: float) -> str:
    """The metrics-file key of one grid point, e.g. `k20_T0.07` (also a valid MLflow name)."""
    return f"k{k}_T{temperature:g}"
