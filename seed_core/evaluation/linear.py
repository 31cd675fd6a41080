"""Linear probes on frozen features, MoCo protocol (fc ~ N(0, 0.01), SGD, lr x0.1 at 60% and
80% of the epochs), and the choice of their learning rate on the holdout split."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from seed_core.evaluation.metrics import check_labels, topk_accuracy
from seed_core.evaluation.splits import grid_edge
from seed_core.progress import progress

log = logging.getLogger(__name__)


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
    for epoch in progress(range(epochs), desc=f"linear probe lr {lr:g}", unit="epoch",
                          leave=False):
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
    check_labels(labels, num_classes, "training labels")
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
    # "lowest" / "highest" when best_lr is an end of the grid: the optimum may lie beyond it
    edge: str | None = None


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
    edge = grid_edge(best[0], list(lrs))
    if edge:
        log.warning("linear probe: the best lr %g is the %s of linear.lrs %s; the optimum may "
                    "lie beyond the grid", best[0], edge, list(lrs))
    return LrSelection(best_lr=best[0], lr_top1=lr_top1, model=best[2], holdout=best[3],
                       edge=edge)


