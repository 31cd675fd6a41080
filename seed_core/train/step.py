"""What every optimisation step shares: the non-finite loss check and the (scaled) backward."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


def check_finite(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss).all():
        raise NonFiniteLossError(
            f"loss is {loss.item()} at {where}: training diverged. Lower the learning rate "
            f"(lr), raise the temperatures, or use precision fp32; the last checkpoint is kept")



def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any,
                  where: str = "this step") -> None:
    """Backward and optimizer step. Without a grad scaler (fp32, bf16) the gradients must be
    finite: on CPU, oneDNN's bf16 weight-gradient kernels have been seen here to return NaN in a
    few entries of one convolution (`resnet18d`'s layer4.0.conv1, 1,024 of 1.2M weights, in 2 of
    4 five-step MoCo runs at batch 64 under load) while the loss and every other gradient were
    fine, and the same run gave finite values on the next try. One process recomputes the backward
    once from the kept graph; a second non-finite gradient, or one under DDP, stops training
    before the weights are spoiled (the last checkpoint is kept). GradScaler (fp16) skips such
    steps itself."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return
    alone = not (dist.is_initialized() and dist.get_world_size() > 1)
    loss.backward(retain_graph=alone)
    bad = nonfinite_gradients(optimizer)
    if bad and alone:
        log.warning("non-finite gradient at %s in %s with a finite loss; recomputing the "
                    "backward pass once", where, bad[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bad = nonfinite_gradients(optimizer)
    if bad:
        raise NonFiniteLossError(
            f"non-finite gradient at {where} in {len(bad)} parameter tensor(s) (first: {bad[0]}) "
            f"with a finite loss {loss.item():.4g}: use precision fp32; the last checkpoint is "
            f"kept")
    optimizer.step()


def nonfinite_gradients(optimizer: torch.optim.Optimizer) -> list[str]:
    """Shapes of the parameters whose gradient holds a NaN or an infinity (one fused check)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        return []
    return [f"a {tuple(g.shape)} gradient" for g in grads if not torch.isfinite(g).all()]
