"""Evaluation of frozen representations: weighted kNN, linear probes, holdout splits.

Pure tensor functions, no I/O. The kNN vote follows InstDisc / DINO `eval_knn.py`; the linear
probe follows MoCo's protocol (fc ~ N(0, 0.01), SGD, lr x0.1 at 60% and 80% of the epochs).
Hyper-parameters (k, T, the probe's lr) are meant to be chosen on `holdout_split` of the training
set, so the test split is scored once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Default chunking: 1024 x 32768 fp32 similarities = 128 MiB, large enough for fast GEMMs.
TEST_CHUNK = 1024
BANK_CHUNK = 32768

FEATURE_KEYS = ("features", "labels", "index")


# ---------------------------------------------------------------- kNN


@torch.no_grad()
def knn_neighbors(train_features: torch.Tensor, test_features: torch.Tensor, k: int, *,
                  test_chunk: int = TEST_CHUNK, bank_chunk: int = BANK_CHUNK
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar training rows of every test row, most similar first.

    The bank is scanned in chunks with a running top-k merge, so besides the outputs the peak
    extra memory is about `test_chunk x (bank_chunk + 2k) + bank_chunk x F` floats (one block
    of similarities, one normalised bank chunk) whatever the bank size.

    Args:
        train_features: bank `(N, F)`, any float dtype and device (not modified, not copied).
        test_features: queries `(M, F)`; the computation runs on their device.
        k: neighbours wanted; clamped to N.

    Returns:
        similarities `(M, k')` float32 and bank row indices `(M, k')` int64, k' = min(k, N).
    """
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"features must be 2-D, got bank {tuple(train_features.shape)} and "
                         f"queries {tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature widths differ: bank {train_features.shape[1]}, "
                         f"queries {test_features.shape[1]}")
    if train_features.shape[0] == 0:
        raise ValueError("the kNN bank is empty")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = test_features.device
    bank_size, queries = train_features.shape[0], test_features.shape[0]
    k = min(k, bank_size)
    best_sim = torch.full((queries, k), -math.inf, device=device)
    best_idx = torch.zeros((queries, k), dtype=torch.long, device=device)
    # one similarity buffer reused for every block: fresh large allocations page-fault each time
    buffer = torch.empty(min(test_chunk, queries) * min(bank_chunk, bank_size), device=device)
    # outer loop over the bank: each bank chunk is normalised (and moved) once
    for start in range(0, bank_size, bank_chunk):
        bank = F.normalize(train_features[start:start + bank_chunk].to(device, torch.float32),
                           dim=1)
        kk = min(k, bank.shape[0])
        for q0 in range(0, queries, test_chunk):
            query = F.normalize(test_features[q0:q0 + test_chunk].to(torch.float32), dim=1)
            sim = buffer[:query.shape[0] * bank.shape[0]].view(query.shape[0], bank.shape[0])
            torch.mm(query, bank.T, out=sim)
            chunk_sim, chunk_idx = sim.topk(kk, dim=1)
            rows = slice(q0, q0 + query.shape[0])
            merged_sim = torch.cat([best_sim[rows], chunk_sim], dim=1)
            merged_idx = torch.cat([best_idx[rows], chunk_idx + start], dim=1)
            top_sim, pos = merged_sim.topk(k, dim=1)
            best_sim[rows] = top_sim
            best_idx[rows] = merged_idx.gather(1, pos)
        del bank  # else the next chunk is normalised while this one is still alive
    return best_sim, best_idx


def knn_vote(similarities: torch.Tensor, neighbor_labels: torch.Tensor, temperature: float,
             num_classes: int) -> torch.Tensor:
    """Class scores `(M, C)` from neighbours `(M, k)`: each votes exp(sim / T) for its class.

    Rows are returned as vote shares (divided by their sum): the same ranking as the raw sums
    exp(sim / T), without their overflow at small T (exp(1 / 0.01) exceeds float32).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # subtracting each row's best similarity scales the row by a constant: ranking unchanged
    shifted = (similarities - similarities[:, :1]) / temperature
    weights = shifted.double().exp()
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=torch.float64,
                         device=similarities.device)
    scores.scatter_add_(1, neighbor_labels, weights)
    return (scores / scores.sum(dim=1, keepdim=True)).float()


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, k: int, temperature: float,
                 num_classes: int) -> torch.Tensor:
    """Weighted cosine kNN (InstDisc / DINO): class scores `(M, C)`; argmax = prediction.

    Features are L2-normalised inside. Each of the k nearest training samples (cosine) votes
    for its class with weight exp(sim / T); rows are normalised vote shares (see `knn_vote`).
    k larger than the bank is clamped. Memory stays bounded for ImageNet-size banks.

    Args:
        train_features: `(N, F)`; train_labels: `(N,)` int in [0, C).
        test_features: `(M, F)`.
    """
    if train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(f"{train_features.shape[0]} training features but "
                         f"{train_labels.shape[0]} labels")
    _check_labels(train_labels, num_classes, "training labels")
    sims, idx = knn_neighbors(train_features, test_features, k)
    neighbor_labels = train_labels.to(idx.device)[idx]
    return knn_vote(sims, neighbor_labels, temperature, num_classes)


# ---------------------------------------------------------------- metrics


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
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).double().mean().item() for k in ks}


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


# ---------------------------------------------------------------- linear probe


class LinearDiverged(RuntimeError):
    """The linear probe's loss became non-finite (learning rate too high)."""


def linear_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """MoCo's step schedule: x0.1 from epoch ceil(0.6 E) and again from ceil(0.8 E)."""
    milestones = (math.ceil(0.6 * epochs), math.ceil(0.8 * epochs))
    return base_lr * 0.1 ** sum(epoch >= m for m in milestones)


def feature_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int,
                    generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches `(B, F), (B,)` of cached features; the last one may be short."""
    order = torch.randperm(features.shape[0], generator=generator)
    for start in range(0, order.numel(), batch_size):
        rows = order[start:start + batch_size]
        yield features[rows], labels[rows]


def fit_linear(batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
               in_features: int, num_classes: int, epochs: int, lr: float, momentum: float,
               weight_decay: float, seed: int, device: torch.device | str,
               on_epoch: Callable[[int, float], None] | None = None) -> nn.Linear:
    """Train a linear classifier on whatever `batches(epoch)` yields (features, labels).

    MoCo protocol: weight ~ N(0, 0.01), zero bias, SGD with momentum, `linear_lr` schedule.
    `on_epoch(epoch, mean_loss)` is called after every epoch (curves, logging).

    Raises:
        LinearDiverged: the loss became NaN or infinite.
    """
    generator = torch.Generator().manual_seed(seed)
    fc = nn.Linear(in_features, num_classes)
    with torch.no_grad():
        nn.init.normal_(fc.weight, 0.0, 0.01, generator=generator)
        fc.bias.zero_()
    fc.to(device)
    optimizer = torch.optim.SGD(fc.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = linear_lr(lr, epoch, epochs)
        loss_sum, seen = torch.zeros((), device=device), 0
        for x, y in batches(epoch):
            x, y = x.to(device, torch.float32), y.to(device)
            loss = F.cross_entropy(fc(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * y.shape[0]
            seen += y.shape[0]
        if seen == 0:
            raise ValueError(f"epoch {epoch}: the batch source yielded no samples")
        mean_loss = float(loss_sum) / seen
        if not math.isfinite(mean_loss):
            raise LinearDiverged(f"linear probe diverged at lr {lr:g} (epoch {epoch}, loss "
                                 f"{mean_loss}); use smaller values in linear.lrs")
        if on_epoch is not None:
            on_epoch(epoch, mean_loss)
    return fc.eval()


def train_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int,
                 lr: float, batch_size: int, momentum: float, weight_decay: float, seed: int,
                 device: torch.device | str,
                 on_epoch: Callable[[int, float], None] | None = None) -> nn.Linear:
    """Linear probe on cached features `(N, F)` with labels `(N,)` (MoCo protocol, see
    `fit_linear`); mini-batches are reshuffled every epoch from a generator seeded by `seed`."""
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
    _check_labels(labels, num_classes, "training labels")
    order_gen = torch.Generator().manual_seed(seed + 1)
    return fit_linear(lambda epoch: feature_batches(features, labels, batch_size, order_gen),
                      features.shape[1], num_classes, epochs, lr, momentum, weight_decay, seed,
                      device, on_epoch)


@torch.no_grad()
def predict_linear(fc: nn.Module, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits `(N, C)` on the CPU, computed in batches on the classifier's device."""
    device = next(fc.parameters()).device
    parts = [fc(features[i:i + batch_size].to(device, torch.float32)).cpu()
             for i in range(0, features.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, fc.out_features)


@dataclass
class LrSelection:
    best_lr: float
    lr_top1: dict[float, float | None]  # holdout top-1 per lr; None = diverged
    model: nn.Module  # trained on the fit split at best_lr
    holdout: dict[str, float]  # top1 / top5 of `model` on the holdout split


def select_lr(lrs: Sequence[float], train_fn: Callable[[float], nn.Module],
              holdout_features: torch.Tensor, holdout_labels: torch.Tensor) -> LrSelection:
    """Train `train_fn(lr)` (on the fit split) for each lr, score the holdout split, keep the
    best top-1 (the first in grid order on a tie). A diverged lr scores None."""
    lr_top1: dict[float, float | None] = {}
    best: tuple[float, float, nn.Module, dict[str, float]] | None = None
    for lr in lrs:
        try:
            model = train_fn(lr)
        except LinearDiverged as err:
            log.warning("%s", err)
            lr_top1[lr] = None
            continue
        acc = topk_accuracy(predict_linear(model, holdout_features), holdout_labels)
        lr_top1[lr] = acc["top1"]
        log.info("linear probe lr %g: holdout top-1 %.2f%%", lr, acc["top1"])
        if best is None or acc["top1"] > best[1]:
            best = (lr, acc["top1"], model, acc)
    if best is None:
        raise LinearDiverged(f"the linear probe diverged at every lr in {list(lrs)}; "
                             f"use smaller values in linear.lrs")
    return LrSelection(best_lr=best[0], lr_top1=lr_top1, model=best[2], holdout=best[3])


def select_linear_lr(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     lrs: Sequence[float], holdout_fraction: float, split_seed: int, *,
                     epochs: int, batch_size: int, momentum: float, weight_decay: float,
                     seed: int, device: torch.device | str) -> LrSelection:
    """Cached-feature lr search: train on the fit part of `holdout_split`, score its holdout."""
    fit, hold = holdout_split(labels, holdout_fraction, split_seed)
    fit_x, fit_y = features[fit], labels[fit]

    def train_fn(lr: float) -> nn.Module:
        return train_linear(fit_x, fit_y, num_classes, epochs, lr, batch_size, momentum,
                            weight_decay, seed, device)

    return select_lr(lrs, train_fn, features[hold], labels[hold])
