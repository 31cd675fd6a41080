"""One MoCo-v2 step (He et al. 2020; Chen et al. 2020): InfoNCE of the queries against their
momentum keys and the queue. Used to pre-train the teacher and the student's SSL baseline.

Shuffling BN (MoCo, section 3.3): with plain BatchNorm, the key batch's statistics leak which
key belongs to which query, and the model learns that shortcut instead of the pretext task. MoCo
shuffles the key batch across GPUs, so each GPU's BatchNorm normalises 32 keys whose queries sit
elsewhere; its single-GPU CIFAR demo splits the batch into groups instead. `shuffled_keys` does
both at once, independently of the number of processes: the global key batch is permuted by a
seed of the step, cut into groups of `group` samples, and every group is normalised on its own
(each rank computes its share of the groups with its local, unsynchronised key encoder), then
the keys are put back in order. 1 and N processes therefore compute the same keys.
"""

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


@torch.no_grad()
def shuffled_keys(key_encoder: torch.nn.Module, images_k: torch.Tensor, *, group: int,
                  shuffle_seed: int, gather: Callable, rank: int = 0, world_size: int = 1
                  ) -> torch.Tensor:
    """This rank's keys `(B, D)`, its images `(B, 3, S, S)` normalised by the key encoder's
    BatchNorm in groups of `group` samples of the shuffled global batch (module docstring).

    `gather` concatenates a tensor of every rank in rank order (identity on one process); the
    permutation comes from `shuffle_seed` alone. `group` 0: no shuffle, one forward of the
    local batch (BatchNorm over all of it).
    """
    if group == 0:
        return key_encoder(images_k).float()
    everything = gather(images_k)
    total = everything.shape[0]
    share = total // world_size
    if share % group:
        raise ValueError(f"a rank's {share} keys do not split into groups of {group}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(shuffle_seed))
    mine = order[rank * share:(rank + 1) * share].to(everything.device)
    keys = torch.cat([key_encoder(part).float()
                      for part in everything.index_select(0, mine).split(group)])
    shuffled = gather(keys)
    unshuffled = torch.empty_like(shuffled)
    unshuffled[order.to(shuffled.device)] = shuffled
    return unshuffled[rank * images_k.shape[0]:(rank + 1) * images_k.shape[0]]


def moco_step(query_encoder: torch.nn.Module, key_encoder: torch.nn.Module, queue: Any,
              views: list[torch.Tensor], *, temperature: float, key_momentum: float,
              optimizer: torch.optim.Optimizer, scaler: Any, gather: Callable,
              amp: Callable[[], contextlib.AbstractContextManager],
              where: str, shuffle_bn_group: int = 0, shuffle_seed: int = 0, rank: int = 0,
              world_size: int = 1) -> dict[str, float]:
    """One MoCo-v2 step: InfoNCE of the queries against their keys and the queue, then enqueue.

    `query_encoder` may be DDP-wrapped; `key_encoder` is a plain module updated by momentum from
    the query encoder's parameters (unwrapped), whose BatchNorms normalise this rank's groups
    only (never synchronised: see `shuffled_keys`).
    """
    images_q, images_k = views
    plain_query = getattr(query_encoder, "module", query_encoder)
    momentum_update(key_encoder, plain_query, key_momentum)
    with torch.no_grad(), amp():
        key_z = shuffled_keys(key_encoder, images_k, group=shuffle_bn_group,
                              shuffle_seed=shuffle_seed, gather=gather, rank=rank,
                              world_size=world_size)
    with amp():
        query_z = query_encoder(images_q).float()
    loss = infonce_loss(query_z, key_z, queue.buffer, temperature)
    check_finite(loss, where)
    optimizer.zero_grad(set_to_none=True)
    backward_step(loss, optimizer, scaler, where)
    queue.enqueue(gather(key_z))
    return {"loss": loss.item()}


