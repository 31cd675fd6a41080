"""What every optimisation step shares: the non-finite loss check and the (scaled) backward."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"loss is {loss.item()} at {where}: training diverged. Lower the learning rate "
            f"(lr), raise the temperatures, or use precision fp32; the last checkpoint is kept")



def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any,
                  where: str = "this step") -> bool:
    """Backward and optimizer step; False when the step was skipped.

    Without a grad scaler (fp32, bf16) the gradients must be finite before they reach the
    weights: on CPU, oneDNN's bf16 weight-gradient kernel has been seen here to return NaN in a
    few entries of one convolution (`resnet18d`'s layer4.0.conv1, 1,024 of 1.2M weights, in 2 of
    4 five-step MoCo runs at batch 64 under load) while the loss and every other gradient were
    fine. Such a step is skipped with a warning, as GradScaler (fp16) skips steps with infinite
    gradients; under DDP every rank sees the same reduced gradients and skips together. (The
    graph is not kept for a second backward: compiled modules refuse `retain_graph`.)"""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return True
    loss.backward()
    bad = nonfinite_gradients(optimizer)
    if bad:
        log.warning("non-finite gradient at %s in %d parameter tensor(s) (first: %s) with a "
                    "finite loss %.4g: step skipped", where, len(bad), bad[0], loss.item())
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def nonfinite_gradients(optimizer: torch.optim.Optimizer) -> list[str]:
    """Shapes of the parameters whose gradient holds a NaN or an infinity (one fused check)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        return []
    return [f"a {tuple(g.shape)} gradient" for g in grads if not torch.isfinite(g).all()]
