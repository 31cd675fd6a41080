"""What every optimisation step shares: the non-finite loss check and the (scaled) backward."""

from __future__ import annotations

from typing import Any

import torch


class NonFiniteLossError(RuntimeError):
    pass


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"loss is {loss.item()} at {where}: training diverged. Lower the learning rate "
            f"(lr), raise the temperatures, or use precision fp32; the last checkpoint is kept")



def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


