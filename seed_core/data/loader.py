"""Training and evaluation loaders over a `ShardSet`: map-style reads at byte offsets.

Training (`train_loader`, and `training_batches` for a span of epochs): each rank gets its part
of every global batch as `data/order.py` defines it, so an epoch is one pass over the data
across all ranks and loader workers, and the global batches are the same for any world size or
worker count. Each sample's augmentation is seeded by (seed, epoch, key), never by rank or
worker. A resumed epoch starts at its step without reading the samples before it.

A sample that cannot be read or decoded (a truncated shard, a corrupt image) is replaced, so
every batch keeps its size (collectives need equal shapes), by a sample of the epoch's left-out
remainder (`data/order.py`), which the epoch does not read elsewhere: the remainder's samples are
tried in an order seeded by (seed, epoch, position), so the replacement is the same for any world
size or worker count. Two unreadable samples of one epoch may draw the same remainder sample
(each draw is made where its batch is built, without the others); when the remainder is empty
(N divisible by the global batch) or all of it is unreadable, the next readable samples of the
epoch order are taken, which the epoch also reads (a duplicate, augmented differently), rather
than stop the run for one sample. Every unreadable sample is counted in the batch's `bad` list
and the caller decides when too many is fatal (`check_bad_fraction`).

The per-sample transform runs on one torch thread wherever it runs (loader workers already do;
the main process, with workers=0, switches for each sample): some ops give different float
rounding with more threads, and the pixels must not depend on the worker count.

Evaluation (`eval_loader`): every sample once, in index order, split into contiguous parts by
rank; unreadable samples are left out and counted.

Both loaders raise the process's open-file limit (`raise_open_file_limit`), and with workers a
`LoaderTimeout` that names the batch waited for replaces torch's bare timeout error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import signal
import socket
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from seed_core.data.deferred import ColourLater
from seed_core.data.images import ImageError, decode_image
from seed_core.data.order import EpochPlan, epoch_order, permutation, stream_seed
from seed_core.data.shardset import (SampleReader, SampleReadError, ShardSet,
                                     raise_open_file_limit)
from seed_core.io import UserError

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 64  # consecutive unreadable samples before the shards are declared broken
# seconds a loader with workers waits for one batch: far above a healthy batch (seconds), below
# the collectives' own timeout (NCCL: 30 min), so a stalled read names itself
LOADER_TIMEOUT_S = 600.0
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


class LoaderTimeout(UserError, RuntimeError):
    """A loader worker did not deliver a batch within the loader's timeout."""


class ManifestMismatch(UserError, RuntimeError):
    """Ranks opened shard sets with different manifests."""


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch ops on one intra-op thread inside; the caller's count is restored (~0.3 us)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def seeded(fn: Callable[[], Any], seed: int) -> Any:
    """`fn()` on one torch thread with torch's global generator seeded by `seed`; the caller's
    state is restored, so a loader in the main process (workers=0) leaves the training RNG and
    thread count untouched."""
    # the CPU generator alone: torch.manual_seed also seeds every accelerator backend, which
    # costs about half a millisecond per sample
    generator = torch.random.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        with one_thread():
            return fn()
    finally:
        generator.set_state(state)


def _collate_views(views: Sequence[Any]) -> Any:
    """Stack one view per sample into a batch; several views per sample (a list) into a list of
    batches. A view whose colour is left to the device (`ColourLater`) stacks its pixels and its
    uniforms and keeps its recipe."""
    first = views[0]
    if isinstance(first, ColourLater):  # a NamedTuple: before the generic tuple case
        return ColourLater(torch.stack([v.pixels for v in views]),
                           torch.stack([v.colour for v in views]), first.view)
    if isinstance(first, (list, tuple)):
        return [_collate_views(v) for v in zip(*views)]
    return torch.stack(list(views))


class _Samples(Dataset):
    """Decoding of samples by global index, with one `SampleReader` per process."""

    def __init__(self, shards: ShardSet, transform: Transform) -> None:
        self.shards, self.transform = shards, transform
        self.index = shards.index  # built here, so forked workers inherit it
        self._reader: SampleReader | None = None

    def decode(self, i: int) -> Image.Image:
        """Sample `i` as a decoded PIL image, mode "L" for grayscale sources, else "RGB": what
        the transforms take (`transforms.py`; they also take `uint8 (C, H, W)` tensors)."""
        if self._reader is None:
            self._reader = SampleReader(self.shards)
        return decode_image(self._reader.read(i))

    def __len__(self) -> int:
        return self.shards.samples

    def __getitem__(self, item: Any) -> Any:
        raise NotImplementedError


class TrainSamples(_Samples):
    """Item `(epoch, position)` -> `(views, label, key, bad)` for that position of the epoch
    order; `bad` lists the unreadable samples met on the way (see the module docstring for
    their replacement). With `subset` (sample indices), epochs run over those samples only.
    With `global_batch`, the positions past the epoch's last full global batch are its
    remainder, from which unreadable samples are replaced."""

    def __init__(self, shards: ShardSet, transform: Transform, seed: int,
                 subset: np.ndarray | None = None, global_batch: int | None = None) -> None:
        super().__init__(shards, transform)
        self.seed = seed
        self.subset = None if subset is None else np.asarray(subset, dtype=np.int64)
        self._orders: dict[int, np.ndarray] = {}
        # positions of the order that the epoch's steps read; the rest is the remainder
        self.used = (self.samples if global_batch is None
                     else self.samples // global_batch * global_batch)

    @property
    def samples(self) -> int:
        return self.shards.samples if self.subset is None else len(self.subset)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            order = epoch_order(self.samples, self.seed, epoch)
            self._orders = {epoch: order if self.subset is None else self.subset[order]}
        return self._orders[epoch]

    def candidates(self, epoch: int, position: int) -> Iterator[tuple[int, bool]]:
        """Samples `(index, duplicate)` to read for `position`, in order: its own sample, then
        the remainder's samples in an order seeded by (seed, epoch, position), then the
        samples after it in the epoch order (duplicates: the epoch reads them too)."""
        order = self.order(epoch)
        yield int(order[position]), False
        remainder = order[self.used:]
        for j in permutation(len(remainder), "replacement", self.seed, epoch, position):
            yield int(remainder[j]), False
        for step in range(1, self.used):
            yield int(order[(position + step) % self.used]), True

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, int, str, list[str]]:
        epoch, position = item
        bad: list[str] = []
        for i, duplicate in self.candidates(epoch, position):
            if len(bad) == MAX_REPLACEMENTS:
                raise TooManyBadSamples(
                    f"{self.shards.root}: {MAX_REPLACEMENTS} samples in a row are unreadable "
                    f"({bad[:2]}); re-create the shards")
            try:
                image = self.decode(i)
                break
            except (SampleReadError, ImageError) as err:
                bad.append(f"{self.index.key(i)}: {err}")
        else:
            raise TooManyBadSamples(f"{self.shards.root}: no readable sample left for position "
                                    f"{position} of epoch {epoch} ({bad[:2]})")
        key = self.index.key(i)
        # a duplicate gets its own augmentation: the epoch reads the same key elsewhere
        stream = (("augment", self.seed, epoch, key) if not duplicate
                  else ("augment", self.seed, epoch, key, "duplicate", position))
        views = seeded(lambda: self.transform(image), stream_seed(*stream))
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


class Loader(DataLoader):
    """A DataLoader whose timeout error says what it waited for: `waiting(n)` describes the
    `n`-th batch of an iteration (0-based)."""

    def __init__(self, *args: Any, waiting: Callable[[int], str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting = waiting

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        n = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as err:
                if "DataLoader timed out" not in str(err):
                    raise
                raise LoaderTimeout(
                    f"no batch for {self.timeout:g} s: {self.waiting(n)}, from {self.num_workers} "
                    f"loader worker(s). A worker is stuck: a stalled shard download or "
                    f"filesystem, or a transform that hangs") from None
            yield batch
            n += 1


def _ignore_stop_signals() -> None:
    """A training loader's worker outlives SIGTERM and SIGUSR1: SLURM sends them to every process
    of a job, and the rank that owns the worker stops at its next step boundary with a checkpoint
    (`seed_core.train.stop`); a worker that died first would fail that rank's next batch. The
    rank shuts its workers down on every way out of training (`TrainingRun.fit`): at interpreter
    exit, multiprocessing would SIGTERM them and wait forever. Evaluation loaders keep the
    default."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def _exit_on_unsent_batch(error: Exception, obj: Any) -> None:
    """The worker's batch could not be sent: end the worker, so that its rank fails at once.

    A worker hands a batch to a background thread of its multiprocessing queue, which pickles it:
    torch moves each tensor's storage to shared memory and passes it as a file descriptor, so a
    worker out of open files fails there (EMFILE), after it has delivered the batch as far as it
    can tell. The stdlib's feeder prints such an error and drops the batch; the rank would then
    wait for the loader's timeout (10 min) and blame a stuck worker. A worker that exits instead
    is reported by torch's SIGCHLD handler in the rank at once ("exited unexpectedly")."""
    import os
    import sys
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    print(f"loader worker could not send a batch to its rank ({type(error).__name__}: {error}); "
          "out of open files, raise the limit (`ulimit -n`, or the scheduler's), or use fewer "
          "loader workers", file=sys.stderr, flush=True)
    os._exit(1)


def _init_worker(outlive_stop_signals: bool, worker_id: int) -> None:
    """Every loader worker: a batch it cannot send ends it (`_exit_on_unsent_batch`); a training
    loader's worker outlives the stop signals (`_ignore_stop_signals`)."""
    import multiprocessing.queues

    # the worker is its own process: the queue class is patched there only
    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(_exit_on_unsent_batch)
    if outlive_stop_signals:
        _ignore_stop_signals()


def _data_loader(dataset: Dataset, sampler: Sampler, collate: Callable, workers: int,
                 timeout: float, waiting: Callable[[int], str],
                 outlive_stop_signals: bool = False) -> Loader:
    # a private generator: creating the loader's iterator must not draw from the global RNG;
    # on CUDA, pinned batches cross to the GPU without blocking (seed_core.precision.to_device)
    return Loader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                  prefetch_factor=4 if workers else None, persistent_workers=False,
                  generator=torch.Generator().manual_seed(0),
                  pin_memory=torch.cuda.is_available(),
                  timeout=timeout if workers else 0, waiting=waiting,
                  worker_init_fn=functools.partial(_init_worker, outlive_stop_signals))


def training_batches(shards: ShardSet, transform: Transform, batch_size: int, *, seed: int,
                     rank: int, world_size: int, start: tuple[int, int], stop: tuple[int, int],
                     workers: int = 1, subset: np.ndarray | None = None,
                     timeout: float = LOADER_TIMEOUT_S,
                     outlive_stop_signals: bool = False) -> Loader:
    """Batches of this rank from step `start` to `stop` (`(epoch, step)` pairs), across epochs,
    with one set of loader workers for the whole span (no start-up cost per epoch). With
    `subset`, epochs run over those sample indices only (e.g. all but a holdout split). With
    workers, waiting more than `timeout` seconds for a batch raises `LoaderTimeout`.
    `outlive_stop_signals`: the workers ignore SIGTERM/SIGUSR1 (`_ignore_stop_signals`; the caller
    then shuts them down itself on every way out)."""
    raise_open_file_limit()
    global_batch = batch_size * world_size
    samples = TrainSamples(shards, transform, seed, subset, global_batch)
    plan = EpochPlan(samples.samples, global_batch, world_size)
    if not (0 <= start[1] <= plan.steps and 0 <= stop[1] <= plan.steps):
        raise ValueError(f"steps {start} -> {stop} outside an epoch of {plan.steps} steps")

    def waiting(n: int) -> str:
        epoch, step = divmod(start[0] * plan.steps + start[1] + n, plan.steps)
        return (f"{shards.root}: training batch of rank {rank}/{world_size} at epoch {epoch} "
                f"step {step}")

    return _data_loader(samples, StepSampler(plan, rank, start, stop), collate_train, workers,
                        timeout, waiting, outlive_stop_signals)


def train_loader(shards: ShardSet, transform: Transform, batch_size: int, *, seed: int,
                 epoch: int, rank: int, world_size: int, steps: int, start_step: int = 0,
                 workers: int = 1, timeout: float = LOADER_TIMEOUT_S) -> Loader:
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
                            stop=(epoch, steps), workers=workers, timeout=timeout)


# ----------------------------------------------------------------------------- evaluation


class EvalSamples(_Samples):
    """Item `i` -> `(image, label, i, key, error)`; an unreadable sample has image None."""

    def __getitem__(self, i: int) -> tuple[Any, int, int, str, str | None]:
        key = self.index.key(i)
        try:
            image = self.decode(i)
            with one_thread():  # the same pixels for any worker count
                image = self.transform(image)
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
                limit: int | None = None, *, rank: int = 0, world_size: int = 1,
                timeout: float = LOADER_TIMEOUT_S) -> EvalBatches:
    """Batches `{"image", "label", "index", "key"}` of this rank's part of the first `limit`
    samples (all by default), in index order; the parts of all ranks partition them. With
    workers, waiting more than `timeout` seconds for a batch raises `LoaderTimeout`."""
    raise_open_file_limit()
    samples = shards.samples if limit is None else min(limit, shards.samples)
    mine = rank_range(samples, rank, world_size)
    batches = [list(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]

    def waiting(n: int) -> str:
        part = batches[n] if n < len(batches) else [0]
        return (f"{shards.root}: evaluation batch {n + 1} of {len(batches)} (samples "
                f"{part[0]}-{part[-1]}) of rank {rank}/{world_size}")

    return EvalBatches(_data_loader(EvalSamples(shards, transform), batches, collate_eval,
                                    workers, timeout, waiting))


# ----------------------------------------------------------------------------- agreement


def manifest_digest(shards: ShardSet) -> str:
    """sha256 of the manifest's canonical JSON: equal for the same shards wherever they lie."""
    text = json.dumps(shards.manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_manifest(shards: ShardSet, all_gather_objects: Callable[[Any], list]) -> None:
    """Raise `ManifestMismatch` on every rank unless all ranks opened the same manifest
    (collective: every rank calls it, with e.g. `distributed.all_gather_objects`). Ranks that
    read different shards would train on a different epoch order each, silently."""
    everyone = all_gather_objects((manifest_digest(shards),
                                   f"{socket.gethostname()}:{shards.location}"))
    digest, where = everyone[0]
    for rank, (other, other_where) in enumerate(everyone):
        if other != digest:
            raise ManifestMismatch(
                f"the ranks opened different shard sets: rank 0 read manifest {digest[:16]} "
                f"at {where}, rank {rank} read manifest {other[:16]} at {other_where}; every "
                f"rank must read the same shards (copy them again, or point every node at one "
                f"location)")


def log_bad(bad: Iterable[str], what: str, limit: int = 10) -> int:
    """Log the first unreadable samples; returns how many there were."""
    bad = list(bad)
    for message in bad[:limit]:
        log.warning("%s: unreadable sample skipped: %s", what, message)
    if len(bad) > limit:
        log.warning("%s: ... and %d more unreadable samples", what, len(bad) - limit)
    return len(bad)
