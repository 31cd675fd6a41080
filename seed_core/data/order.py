"""The order of an epoch: one permutation of every sample, a function of (seed, epoch) alone.

An epoch visits the samples in `epoch_order(N, seed, epoch)`. Global batch `i` is the slice
`[i * G, (i + 1) * G)` of that order (G = the global batch); rank `r` of `W` takes the `r`-th
contiguous part of it, `G / W` samples. So global batch `i` holds the same samples, in the same
order once the ranks' parts are concatenated, for any number of ranks or loader workers
(MosaicML Streaming's "elastic determinism"). The last `N mod G` samples of the order are left
out; the order changes every epoch, so a different remainder is left out each time.

The permutation shuffles blocks of `BLOCK` consecutive samples, then shuffles the samples inside
windows of `WINDOW`: a loader reads mostly sequential runs of a shard, and a dataset of up to
`WINDOW` samples gets a uniform permutation. Shards are written in a seeded global permutation
of the TSV (`data/convert.py`), so a class-sorted TSV still gives class-mixed blocks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from seed_core.io import UserError

BLOCK = 64  # consecutive samples of a shard read together (a few MB of ImageNet JPEGs)
WINDOW = 8192  # samples shuffled together after the block shuffle


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple; stable across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_order(num_samples: int, seed: int, epoch: int, block: int = BLOCK,
                window: int = WINDOW) -> np.ndarray:
    """A permutation `(N,)` int64 of `range(num_samples)` for one epoch."""
    rng = np.random.default_rng(stream_seed("epoch order", seed, epoch))
    blocks = -(-num_samples // block)
    order = (rng.permutation(blocks)[:, None] * block + np.arange(block)).ravel()
    order = order[order < num_samples]
    for start in range(0, num_samples, window):
        rng.shuffle(order[start:start + window])  # a view: shuffled in place
    return order


class PlanError(UserError, ValueError):
    """A batch that the data or the number of processes cannot fill."""


def steps_per_epoch(shards, global_batch: int) -> int:
    """Full global batches in one epoch of `shards` (a `ShardSet` or a sample count)."""
    samples = shards if isinstance(shards, int) else shards.samples
    where = "" if isinstance(shards, int) else f"{shards.root}: "
    steps = samples // global_batch
    if steps < 1:
        raise PlanError(f"{where}{samples} samples cannot fill one global batch of "
                         f"{global_batch}; lower the batch size or use more data")
    return steps


@dataclass(frozen=True)
class EpochPlan:
    """Which positions of the epoch order each rank takes at each step."""

    num_samples: int
    global_batch: int
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or self.global_batch % self.world_size:
            raise PlanError(f"the global batch {self.global_batch} is not divisible by the "
                             f"world size {self.world_size}")
        steps_per_epoch(self.num_samples, self.global_batch)

    @property
    def steps(self) -> int:
        return self.num_samples // self.global_batch

    @property
    def batch_size(self) -> int:
        """Per rank."""
        return self.global_batch // self.world_size

    @property
    def remainder(self) -> int:
        """Samples of the epoch order that no step uses (fewer than one global batch)."""
        return self.num_samples - self.steps * self.global_batch

    def positions(self, step: int, rank: int) -> range:
        """Positions in the epoch order of rank `rank`'s batch at step `step`."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} outside the epoch's {self.steps} steps")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside the world size {self.world_size}")
        start = step * self.global_batch + rank * self.batch_size
        return range(start, start + self.batch_size)
