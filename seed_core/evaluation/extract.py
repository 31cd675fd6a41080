"""Features of a whole shard set under any number of ranks: each rank extracts its contiguous
part, rank 0 gathers the parts (`distributed.gather_to_main`, which works across machines
without a shared disk) and merges them by sample index, each sample exactly once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from seed_core import distributed
from seed_core.data.loader import Transform, eval_loader
from seed_core.data.shardset import ShardSet
from seed_core.evaluation.features import extract_features, merge_by_index


@dataclass(frozen=True)
class SplitFeatures:
    """Features `(N, F)`, labels `(N,)` and sample indices `(N,)` sorted by index, and the
    samples that could not be read."""

    features: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    bad: list[str]


def extract_split(fn: Callable[[torch.Tensor], torch.Tensor], shards: ShardSet,
                  transform: Transform, batch_size: int, workers: int, precision: str,
                  runtime: distributed.Runtime, desc: str) -> SplitFeatures | None:
    """`fn` over every readable sample of `shards`: the merged result on rank 0, None elsewhere
    (every rank must call)."""
    loader = eval_loader(shards, transform, batch_size, workers, rank=runtime.rank,
                         world_size=runtime.world_size)
    part = extract_features(fn, loader, runtime.device, precision, desc=desc)
    parts = distributed.gather_to_main((part, loader.bad))
    if parts is None:
        return None
    features, labels, index = merge_by_index([p[0] for p in parts])
    return SplitFeatures(features, labels, index, [message for p in parts for message in p[1]])
