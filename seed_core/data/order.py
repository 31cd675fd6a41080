"""The order of an epoch: one permutation of every sample, a function of (seed, epoch) alone.

An epoch visits the samples in `epoch_order(N, seed, epoch)`. Global batch `i` is the slice
`[i * G, (i + 1) * G)` of that order (G = the global batch); rank `r` of `W` takes the `r`-th
contiguous part of it, `G / W` samples. So global batch `i` holds the same samples, in the same
order once the ranks' parts are concatenated, for any number of ranks or loader workers
(MosaicML Streaming's "elastic determinism"). The last `N mod G` samples of the order are left
out (the epoch's remainder, from which unreadable samples are replaced); the order changes every
epoch, so a different remainder is left out each time.

The permutation is uniform: every batch mixes the classes as random sampling would, whatever
order the shards were written in (`--keep-order`, or class-sorted shards made elsewhere). Reads
are random preads at byte offsets (`SampleReader`), so nothing is gained by reading runs of a
shard. The algorithm is this project's own, so an order never changes with a numpy release:
sample `i` gets the key `splitmix64(stream + i * GAMMA)` (Steele et al.'s SplitMix64 output
function over a Weyl sequence, in numpy uint64 arithmetic, `stream` from `stream_seed`), and the
order sorts the keys. The output function is a bijection of 64-bit integers and the Weyl
sequence does not repeat within 2^64 steps, so the keys are distinct: no ties to break.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from seed_core.io import UserError

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: odd, so i * GAMMA never repeats mod 2^64


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple; stable across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 `x` (wrapping arithmetic): a 64-bit bijection."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def hash_keys(stream: int, count: int) -> np.ndarray:
    """`(count,)` uint64 keys `splitmix64(stream + (i + 1) * GAMMA)` for i in range(count)."""
    i = np.arange(1, count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return splitmix64(np.uint64(stream) + i * np.uint64(GAMMA))


def permutation(count: int, *seed: int | str) -> np.ndarray:
    """A uniform permutation `(count,)` int64 of `range(count)`, a function of `seed` alone."""
    return np.argsort(hash_keys(stream_seed(*seed), count), kind="stable").astype(np.int64)


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation `(N,)` int64 of `range(num_samples)` for one epoch."""
    return permutation(num_samples, "epoch order", seed, epoch)


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
