"""The optimiser and learning-rate schedules of MoCo and SEED: SGD, the linear scaling rule, and
either of two schedules:

- `warmup_cosine` (this project's default): per step, a linear warm-up from ~0 over
  `warmup_epochs`, then half a cosine from the warm-up's end down to 0;
- `seed` (SEED's released `adjust_learning_rate`): per epoch, the base rate held constant for the
  warm-up epochs, then `0.5 * (1 + cos(pi * epoch / epochs))` of it, counted from epoch 0 (so
  the first epoch after the warm-up already starts below the base rate, and the last epoch is
  not at 0).
"""

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


def seed_released(epochs: int, steps_per_epoch: int, warmup_epochs: float
                  ) -> Callable[[int], float]:
    """LR multiplier per step of SEED's released schedule (module docstring)."""
    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        if epoch < warmup_epochs:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
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
    kind: str = "warmup_cosine"  # or "seed" (module docstring)

    def multiplier(self) -> Callable[[int], float]:
        """The LR multiplier per global step."""
        if self.kind == "seed":
            return seed_released(self.epochs, self.steps_per_epoch, self.warmup_epochs)
        return cosine_with_warmup(self.total_steps, self.warmup_steps)

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
                    cfg.momentum, cfg.weight_decay, cfg.warmup_epochs,
                    getattr(cfg, "lr_schedule", "warmup_cosine"))
