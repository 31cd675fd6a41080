"""The optimiser and learning-rate schedule MoCo and SEED share: SGD, the linear scaling rule,
linear warm-up then a half cosine."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from seed_core.data.order import steps_per_epoch


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of MoCo and SEED: lr = base x global batch / 256."""
    return base_lr * global_batch / 256


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up from ~0, then half a cosine down to 0."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress_ = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress_))
    return factor


def build_sgd(model: torch.nn.Module, lr: float, momentum: float,
              weight_decay: float) -> torch.optim.SGD:
    """SGD over the trainable parameters; weight decay on all of them, as MoCo and SEED do."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)


@dataclass
class Schedule:
    epochs: int
    steps_per_epoch: int
    global_batch: int
    base_lr: float
    momentum: float
    weight_decay: float
    warmup_epochs: float

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_epochs * self.steps_per_epoch))

    @property
    def lr(self) -> float:
        return scaled_lr(self.base_lr, self.global_batch)


def schedule_for(cfg: Any, epochs: int, shards: Any) -> Schedule:
    """The schedule of a `pretrain` or `distill` params section over `shards` (a `ShardSet`);
    fails naming the numbers when the data cannot fill one global batch."""
    return Schedule(epochs, steps_per_epoch(shards, cfg.batch_size), cfg.batch_size, cfg.lr,
                    cfg.momentum, cfg.weight_decay, cfg.warmup_epochs)
