"""One MoCo-v2 step (He et al. 2020; Chen et al. 2020): InfoNCE of the queries against their
momentum keys and the queue. Used to pre-train the teacher and the student's SSL baseline."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from seed_core.losses import infonce_loss
from seed_core.train.step import backward_step, check_finite


@torch.no_grad()
def momentum_update(key_encoder: torch.nn.Module, query_encoder: torch.nn.Module,
                    momentum: float) -> None:
    """key = m * key + (1 - m) * query, parameters only (BN statistics are the key's own)."""
    for k, q in zip(key_encoder.parameters(), query_encoder.parameters()):
        k.mul_(momentum).add_(q.detach(), alpha=1.0 - momentum)


def moco_step(query_encoder: torch.nn.Module, key_encoder: torch.nn.Module, queue: Any,
              views: list[torch.Tensor], *, temperature: float, key_momentum: float,
              optimizer: torch.optim.Optimizer, scaler: Any, gather: Callable,
              amp: Callable[[], contextlib.AbstractContextManager],
              where: str) -> dict[str, float]:
    """One MoCo-v2 step: InfoNCE of the queries against their keys and the queue, then enqueue.

    `query_encoder` may be DDP-wrapped; `key_encoder` is a plain module updated by momentum from
    the query encoder's parameters (unwrapped).
    """
    images_q, images_k = views
    plain_query = getattr(query_encoder, "module", query_encoder)
    momentum_update(key_encoder, plain_query, key_momentum)
    with torch.no_grad(), amp():
        key_z = key_encoder(images_k).float()
    with amp():
        query_z = query_encoder(images_q).float()
    loss = infonce_loss(query_z, key_z, queue.buffer, temperature)
    check_finite(loss, where)
    optimizer.zero_grad(set_to_none=True)
    backward_step(loss, optimizer, scaler, where)
    queue.enqueue(gather(key_z))
    return {"loss": loss.item()}


