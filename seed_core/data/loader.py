"""Training and evaluation loaders over a `ShardSet`: map-style reads at byte offsets.

Training (`train_loader`, and `training_batches` for a span of epochs): each rank gets its part
of every global batch as `data/order.py` defines it, so an epoch is one pass over the data
across all ranks and loader workers, and the global batches are the same for any world size or
worker count. Each sample's augmentation is seeded by (seed, epoch, key), never by rank or
worker. A resumed epoch starts at its step without reading the samples before it.

A sample that cannot be read or decoded (a truncated shard, a corrupt image) is replaced by the
next readable sample of the epoch order, so every batch keeps its size (collectives need equal
shapes); each replacement is counted in the batch's `bad` list and the caller decides when too
many is fatal (`check_bad_fraction`).

Evaluation (`eval_loader`): every sample once, in index order, split into contiguous parts by
rank; unreadable samples are left out and counted.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from seed_core.data.images import ImageError, decode_pixels
from seed_core.data.order import EpochPlan, epoch_order, stream_seed
from seed_core.data.shardset import SampleReader, SampleReadError, ShardSet
from seed_core.io import UserError

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 64  # consecutive unreadable samples before the shards are declared broken
Transform = Callable[[torch.Tensor], Any]


class TooManyBadSamples(UserError, RuntimeError):
    """More unreadable samples than the allowed fraction."""


def check_bad_fraction(bad: int, seen: int, max_fraction: float, where: str,
                       examples: Sequence[str] = ()) -> None:
    """Raise `TooManyBadSamples` when `bad / seen` exceeds `max_fraction`."""
    if seen and bad > max_fraction * seen:
        shown = "; ".join(examples[:3])
        raise TooManyBadSamples(
            f"{where}: {bad} of {seen} samples ({100 * bad / seen:.2f}%) could not be read, more "
            f"than the allowed {100 * max_fraction:g}% (data.max_bad_fraction); repair or "
            f"re-create the shards. First: {shown}")


def seeded(fn: Callable[[], Any], seed: int) -> Any:
    """`fn()` with torch's global generator seeded by `seed`; the caller's state is restored,
    so a loader in the main process (workers=0) leaves the training RNG untouched."""
    # the CPU generator alone: torch.manual_seed also seeds every accelerator backend, which
    # costs about half a millisecond per sample
    generator = torch.random.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return fn()
    finally:
        generator.set_state(state)


def _collate_views(views: Sequence[Any]) -> Any:
    if isinstance(views[0], (list, tuple)):
        return [torch.stack(v) for v in zip(*views)]
    return torch.stack(list(views))


class _Samples(Dataset):
    """Decoding of samples by global index, with one `SampleReader` per process."""

    def __init__(self, shards: ShardSet, transform: Transform) -> None:
        self.shards, self.transform = shards, transform
        self.index = shards.index  # built here, so forked workers inherit it
        self._reader: SampleReader | None = None

    def decode(self, i: int) -> torch.Tensor:
        """Sample `i` as `uint8 (C, H, W)`, C = 1 for grayscale sources, else 3 (RGB)."""
        if self._reader is None:
            self._reader = SampleReader(self.shards)
        pixels = torch.from_numpy(decode_pixels(self._reader.read(i)).copy())
        return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)

    def __len__(self) -> int:
        return self.shards.samples

    def __getitem__(self, item: Any) -> Any:
        raise NotImplementedError


class TrainSamples(_Samples):
    """Item `(epoch, position)` -> `(views, label, key, bad)` for that position of the epoch
    order; `bad` lists the unreadable samples replaced on the way. With `subset` (sample
    indices), epochs run over those samples only."""

    def __init__(self, shards: ShardSet, transform: Transform, seed: int,
                 subset: np.ndarray | None = None) -> None:
        super().__init__(shards, transform)
        self.seed = seed
        self.subset = None if subset is None else np.asarray(subset, dtype=np.int64)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def samples(self) -> int:
        return self.shards.samples if self.subset is None else len(self.subset)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            order = epoch_order(self.samples, self.seed, epoch)
            self._orders = {epoch: order if self.subset is None else self.subset[order]}
        return self._orders[epoch]

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, int, str, list[str]]:
        epoch, position = item
        order = self.order(epoch)
        bad: list[str] = []
        for attempt in range(MAX_REPLACEMENTS):
            i = int(order[(position + attempt) % len(order)])
            try:
                image = self.decode(i)
                break
            except (SampleReadError, ImageError) as err:
                bad.append(f"{self.index.key(i)}: {err}")
        else:
            raise TooManyBadSamples(f"{self.shards.root}: {MAX_REPLACEMENTS} consecutive samples "
                                    f"of the epoch order are unreadable ({bad[:2]}); re-create "
                                    f"the shards")
        key = self.index.key(i)
        views = seeded(lambda: self.transform(image), stream_seed("augment", self.seed, epoch, key))
        return views, int(self.index.labels[i]), key, bad


def collate_train(items: Sequence[tuple[Any, int, str, list[str]]]) -> dict[str, Any]:
    views, labels, keys, bad = zip(*items)
    worker = get_worker_info()  # collation runs where the batch is built
    return {"image": _collate_views(views), "label": torch.tensor(labels, dtype=torch.long),
            "key": list(keys), "bad": [message for part in bad for message in part],
            "worker": worker.id if worker is not None else None}


class StepSampler(Sampler):
    """This rank's `(epoch, position)` lists, step after step, from `start` to `stop` (each an
    `(epoch, step)` pair; `stop` excluded)."""

    def __init__(self, plan: EpochPlan, rank: int, start: tuple[int, int],
                 stop: tuple[int, int]) -> None:
        self.plan, self.rank, self.start, self.stop = plan, rank, start, stop

    def steps(self) -> Iterator[tuple[int, int]]:
        epoch, step = self.start
        while (epoch, step) < self.stop:
            yield epoch, step
            epoch, step = (epoch + 1, 0) if step + 1 == self.plan.steps else (epoch, step + 1)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, step in self.steps():
            yield [(epoch, p) for p in self.plan.positions(step, self.rank)]

    def __len__(self) -> int:
        (e0, s0), (e1, s1) = self.start, self.stop
        return max(0, (e1 - e0) * self.plan.steps + s1 - s0)


def _data_loader(dataset: Dataset, sampler: Sampler, collate: Callable, workers: int
                 ) -> DataLoader:
    # a private generator: creating the loader's iterator must not draw from the global RNG
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                      prefetch_factor=4 if workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(0))


def training_batches(shards: ShardSet, transform: Transform, batch_size: int, *, seed: int,
                     rank: int, world_size: int, start: tuple[int, int], stop: tuple[int, int],
                     workers: int = 1, subset: np.ndarray | None = None) -> DataLoader:
    """Batches of this rank from step `start` to `stop` (`(epoch, step)` pairs), across epochs,
    with one set of loader workers for the whole span (no start-up cost per epoch). With
    `subset`, epochs run over those sample indices only (e.g. all but a holdout split)."""
    samples = TrainSamples(shards, transform, seed, subset)
    plan = EpochPlan(samples.samples, batch_size * world_size, world_size)
    if not (0 <= start[1] <= plan.steps and 0 <= stop[1] <= plan.steps):
        raise ValueError(f"steps {start} -> {stop} outside an epoch of {plan.steps} steps")
    return _data_loader(samples, StepSampler(plan, rank, start, stop), collate_train, workers)


def train_loader(shards: ShardSet, transform: Transform, batch_size: int, *, seed: int,
                 epoch: int, rank: int, world_size: int, steps: int, start_step: int = 0,
                 workers: int = 1) -> DataLoader:
    """Exactly `steps - start_step` batches of `batch_size` samples (per rank) of one epoch.

    Each batch is `{"image": (B, 3, S, S) or [views], "label": (B,) long, "key": [B TSV keys],
    "bad": [messages of unreadable samples replaced], "worker": loader worker id or None}`.
    `steps` may be at most the epoch's `steps_per_epoch(shards, batch_size * world_size)`.
    """
    plan = EpochPlan(shards.samples, batch_size * world_size, world_size)
    if not 0 <= start_step <= steps <= plan.steps:
        raise ValueError(f"steps {start_step}..{steps} outside the epoch's {plan.steps} steps "
                         f"({shards.samples} samples, global batch {plan.global_batch})")
    return training_batches(shards, transform, batch_size, seed=seed, rank=rank,
                            world_size=world_size, start=(epoch, start_step),
                            stop=(epoch, steps), workers=workers)


# ----------------------------------------------------------------------------- evaluation


class EvalSamples(_Samples):
    """Item `i` -> `(image, label, i, key, error)`; an unreadable sample has image None."""

    def __getitem__(self, i: int) -> tuple[Any, int, int, str, str | None]:
        key = self.index.key(i)
        try:
            image = self.transform(self.decode(i))
        except (SampleReadError, ImageError) as err:
            return None, -1, i, key, f"{key}: {err}"
        return image, int(self.index.labels[i]), i, key, None


def collate_eval(items: Sequence[tuple[Any, int, int, str, str | None]]) -> dict[str, Any]:
    good = [item for item in items if item[4] is None]
    out: dict[str, Any] = {"bad": [item[4] for item in items if item[4] is not None],
                           "index": torch.tensor([item[2] for item in good], dtype=torch.long),
                           "label": torch.tensor([item[1] for item in good], dtype=torch.long),
                           "key": [item[3] for item in good]}
    out["image"] = _collate_views([item[0] for item in good]) if good else None
    return out


class EvalBatches:
    """Iterates the evaluation batches that hold a sample; collects the unreadable ones."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.bad: list[str] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.bad = []
        for batch in self.loader:
            self.bad.extend(batch.pop("bad"))
            if batch["image"] is not None:
                yield batch

    def __len__(self) -> int:
        return len(self.loader)


def rank_range(samples: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous part of `range(samples)`; the parts partition it."""
    return range(samples * rank // world_size, samples * (rank + 1) // world_size)


def eval_loader(shards: ShardSet, transform: Transform, batch_size: int, workers: int = 0,
                limit: int | None = None, *, rank: int = 0, world_size: int = 1) -> EvalBatches:
    """Batches `{"image", "label", "index", "key"}` of this rank's part of the first `limit`
    samples (all by default), in index order; the parts of all ranks partition them."""
    samples = shards.samples if limit is None else min(limit, shards.samples)
    mine = rank_range(samples, rank, world_size)
    batches = [list(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
    return EvalBatches(_data_loader(EvalSamples(shards, transform), batches, collate_eval,
                                    workers))


def log_bad(bad: Iterable[str], what: str, limit: int = 10) -> int:
    """Log the first unreadable samples; returns how many there were."""
    bad = list(bad)
    for message in bad[:limit]:
        log.warning("%s: unreadable sample skipped: %s", what, message)
    if len(bad) > limit:
        log.warning("%s: ... and %d more unreadable samples", what, len(bad) - limit)
    return len(bad)
