"""Choosing the kNN hyper-parameters (k, T) on the holdout split, so the test split is scored once
with values it never influenced. The linear probe's lr is chosen on the same split in `linear`.

The configured (knn.k, knn.temperature) is kept unless the grid's best pair beats it on the
holdout by a paired test (one-sided McNemar, p < `SELECT_ALPHA`): a pair that wins by three
holdout images in a thousand is noise, not evidence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from seed_core.evaluation.knn import knn_neighbors, knn_vote
from seed_core.evaluation.splits import grid_edge
from seed_core.evaluation.stats import mcnemar

log = logging.getLogger(__name__)

SELECT_ALPHA = 0.05  # the holdout evidence needed to leave the configured (k, T)


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
    best: tuple[int, float]  # the grid's best pair on the holdout (ties: configured first)
    p_value: float | None  # one-sided McNemar, best vs configured; None when they are one

    @property
    def is_configured(self) -> bool:
        return (self.k, self.temperature) == self.configured


@torch.no_grad()
def select_knn(fit_features: torch.Tensor, fit_labels: torch.Tensor,
               holdout_features: torch.Tensor, holdout_labels: torch.Tensor,
               ks: Sequence[int], temperatures: Sequence[float], configured: tuple[int, float],
               num_classes: int) -> KnnSelection:
    """Score every (k, T) of the grid on the holdout (the fit part of train as the bank); keep the
    configured pair unless the best one beats it significantly (module docstring).

    The best pair is the one with the most correct holdout samples; ties go to the configured
    pair when it is among them, otherwise to the first tied pair in grid order (smallest k, then
    smallest T).

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
    correct: dict[tuple[int, float], torch.Tensor] = {}
    for k in ks:
        for t in temperatures:
            scores = knn_vote(sims[:, :k], neighbor_labels[:, :k], t, num_classes)
            correct[(k, t)] = (scores.argmax(dim=1) == truth).cpu()
    counts = {pair: int(c.sum()) for pair, c in correct.items()}
    top = max(counts.values())
    tied = [pair for pair in counts if counts[pair] == top]  # grid order: k, then T
    best = configured if configured in tied else tied[0]
    p_value = None
    chosen = configured
    if best != configured:
        p_value = mcnemar(correct[best].numpy(), correct[configured].numpy(),
                          alternative="greater").p_value
        chosen = best if p_value < SELECT_ALPHA else configured
    n = holdout_labels.numel()
    return KnnSelection(k=chosen[0], temperature=chosen[1], top1=100.0 * counts[chosen] / n,
                        grid_top1={pair: 100.0 * c / n for pair, c in counts.items()},
                        configured=configured, k_edge=grid_edge(chosen[0], ks),
                        temperature_edge=grid_edge(chosen[1], temperatures), best=best,
                        p_value=p_value)


def grid_key(k: int, temperature: float) -> str:
    """The metrics-file key of one grid point, e.g. `k20_T0.07` (also a valid MLflow name)."""
    return f"k{k}_T{temperature:g}"
