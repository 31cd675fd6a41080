"""Loading WebDataset shards for training (DDP, resumable) and evaluation (each sample once).

Training: each rank runs exactly `steps` batches per epoch whatever the shard sizes, so no rank
waits in a collective for another that ran out of data (uneven shards deadlock DDP otherwise).
Every random choice (shard order, shuffle buffer, each sample's augmentation) is derived from
(seed, epoch, rank, logical worker, sample number), so an epoch can be re-entered at any step
and produce the same batches: that is what exact resume after a crash needs.

Evaluation: shards are dealt to ranks and workers without overlap, in file order, and every
sample carries its global index (its position in the TSV after skipped lines), so features
gathered from all ranks can be put back in one stable order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from seed_core.data.transforms import decode_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm")


@dataclass(frozen=True)
class ShardSet:
    """A directory of shards described by its `manifest.json`."""

    root: Path
    names: tuple[str, ...]
    counts: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...] | None = None

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def paths(self) -> list[str]:
        return [str(self.root / name) for name in self.names]

    def offsets(self) -> list[int]:
        """Global index of each shard's first sample."""
        out, total = [], 0
        for count in self.counts:
            out.append(total)
            total += count
        return out


def open_shards(root: str | Path) -> ShardSet:
    """Read `root/manifest.json` (written by stages/shards.py)."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{manifest_path}: no shard manifest; create the shards with "
            f"`python stages/shards.py --tsv FILE --out {root}`")
    manifest = json.loads(manifest_path.read_text())
    shards = manifest.get("shards")
    if not shards:
        raise ValueError(f"{manifest_path}: lists no shards (every record was skipped?)")
    names = tuple(s["name"] for s in shards)
    counts = tuple(int(s["samples"]) for s in shards)
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(f"{root}: shards listed in manifest.json are missing: {missing[:3]}")
    class_names = manifest.get("class_names")
    return ShardSet(root=root, names=names, counts=counts,
                    num_classes=int(manifest["num_classes"]),
                    class_names=tuple(class_names) if class_names else None)


def stream_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple; stable across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__')!r} in {sample.get('__url__')} has no image "
                   f"member (members: {sorted(k for k in sample if not k.startswith('__'))})")


def _read_shard(path: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard; unreadable parts are recorded in `errors`, not raised."""
    from webdataset.tariterators import tarfile_samples

    def handler(exn: Exception) -> bool:
        errors.append(f"{path}: {exn}")
        return True

    yield from tarfile_samples(iter([{"url": path}]), handler=handler)


def _decode(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
    return decode_image(_image_bytes(sample)), int(sample["cls"])


def _collate(items: Sequence[tuple[Any, int]]) -> dict[str, Any]:
    views, labels = zip(*items)
    if isinstance(views[0], (list, tuple)):
        image: Any = [torch.stack(v) for v in zip(*views)]
    else:
        image = torch.stack(views)
    return {"image": image, "label": torch.tensor(labels, dtype=torch.long)}


class TrainStream(IterableDataset):
    """Batches for one rank and epoch; see the module docstring for the determinism contract.

    Logical worker `l` produces the steps `i` with `i % W == l`. DataLoader worker `p` plays
    logical worker `(p + start_step) % W`, so the loader's round-robin yields steps in order
    even when resuming in the middle of an epoch.
    """

    def __init__(self, shards: ShardSet, transform: Callable[[torch.Tensor], Any],
                 batch_size: int, *, seed: int, epoch: int, rank: int, steps: int,
                 start_step: int = 0, workers: int = 1, shuffle_buffer: int = 2000) -> None:
        super().__init__()
        if start_step > steps:
            raise ValueError(f"start_step {start_step} is beyond the epoch's {steps} steps")
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.steps, self.start_step = steps, start_step
        self.workers = max(1, workers)
        self.shuffle_buffer = shuffle_buffer

    def _logical_worker(self) -> int:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        return (physical + self.start_step) % self.workers

    def _steps_of(self, logical: int) -> tuple[int, int]:
        """(batches already done before start_step, batches to produce) for a logical worker."""
        def owned_before(n: int) -> int:
            return n // self.workers + (1 if logical < n % self.workers else 0)

        done = owned_before(self.start_step)
        return done, owned_before(self.steps) - done

    def _raw_stream(self, logical: int, errors: list[str]) -> Iterator[dict[str, Any]]:
        """Endless raw samples: shards in a fresh random order on every pass, then shuffled."""
        rng = random.Random(stream_seed("train", self.seed, self.epoch, self.rank, logical))
        order = list(range(len(self.shards.names)))
        buffer: list[dict[str, Any]] = []
        while True:
            rng.shuffle(order)
            produced = 0
            for index in order:
                for sample in _read_shard(self.shards.paths[index], errors):
                    produced += 1
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    slot = rng.randrange(len(buffer))
                    buffer[slot], sample = sample, buffer[slot]
                    yield sample
            if produced == 0:
                raise RuntimeError(f"{self.shards.root}: no readable sample in any shard "
                                   f"({errors[:3]})")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        logical = self._logical_worker()
        done, todo = self._steps_of(logical)
        errors: list[str] = []
        decode_errors = 0
        stream = self._raw_stream(logical, errors)
        generator = torch.random.default_generator
        number = 0  # decoded samples of this logical worker in this epoch
        skip = done * self.batch_size
        batch: list[tuple[Any, int]] = []
        produced = 0
        while produced < todo:
            sample = next(stream)
            try:
                image, label = _decode(sample)
            except Exception as exn:  # a corrupt record costs one sample, not the run
                decode_errors += 1
                errors.append(f"{sample.get('__url__')}:{sample.get('__key__')}: {exn}")
                continue
            number += 1
            if number <= skip:
                continue
            # one seed per sample: the augmentation does not depend on what ran before it
            generator.manual_seed(stream_seed("aug", self.seed, self.epoch, self.rank, logical,
                                              number))
            batch.append((self.transform(image), label))
            if len(batch) == self.batch_size:
                out = _collate(batch)
                out["decode_errors"] = decode_errors
                out["worker"] = logical
                yield out
                batch = []
                produced += 1
        for message in errors[:10]:
            log.warning("skipped unreadable sample: %s", message)


def steps_per_epoch(shards: ShardSet, global_batch: int) -> int:
    """Full global batches in one pass over the data (the last partial batch is dropped)."""
    steps = shards.samples // global_batch
    if steps < 1:
        raise ValueError(f"{shards.root}: {shards.samples} samples cannot fill one global batch "
                         f"of {global_batch}; lower the batch size or use more data")
    return steps


def train_loader(shards: ShardSet, transform: Callable[[torch.Tensor], Any], batch_size: int, *,
                 seed: int, epoch: int, rank: int, steps: int, start_step: int = 0,
                 workers: int = 1, shuffle_buffer: int = 2000) -> DataLoader:
    """Exactly `steps - start_step` batches of `batch_size` (per rank) for one epoch.

    Each batch is `{"image": (B,3,S,S) or [views...], "label": (B,), "decode_errors": int,
    "worker": int}`; decode_errors counts this worker's skipped samples so far in the epoch.
    """
    dataset = TrainStream(shards, transform, batch_size, seed=seed, epoch=epoch, rank=rank,
                          steps=steps, start_step=start_step, workers=workers,
                          shuffle_buffer=shuffle_buffer)
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      persistent_workers=False, prefetch_factor=2 if workers else None)


class EvalStream(IterableDataset):
    """Every sample of the shards exactly once across ranks and workers, with its global index."""

    def __init__(self, shards: ShardSet, transform: Callable[[torch.Tensor], Any],
                 batch_size: int, *, rank: int = 0, world_size: int = 1,
                 limit: int | None = None) -> None:
        super().__init__()
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.rank, self.world_size = rank, world_size
        self.limit = shards.samples if limit is None else min(limit, shards.samples)

    def _my_shards(self) -> list[int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        offsets = self.shards.offsets()
        wanted = [i for i, off in enumerate(offsets) if off < self.limit]
        mine = wanted[self.rank::self.world_size]
        return mine[worker::workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        offsets = self.shards.offsets()
        errors: list[str] = []
        items: list[tuple[Any, int]] = []
        indices: list[int] = []
        decode_errors = 0
        for shard in self._my_shards():
            position = -1
            for position, sample in enumerate(_read_shard(self.shards.paths[shard], errors)):
                index = offsets[shard] + position
                if index >= self.limit:
                    break
                try:
                    image, label = _decode(sample)
                except Exception as exn:
                    decode_errors += 1
                    errors.append(f"{sample.get('__url__')}:{sample.get('__key__')}: {exn}")
                    continue
                items.append((self.transform(image), label))
                indices.append(index)
                if len(items) == self.batch_size:
                    yield self._batch(items, indices, decode_errors)
                    items, indices = [], []
            if position + 1 < self.shards.counts[shard] and offsets[shard] + position + 1 < \
                    self.limit:
                errors.append(f"{self.shards.paths[shard]}: ended after {position + 1} of "
                              f"{self.shards.counts[shard]} samples")
        if items:
            yield self._batch(items, indices, decode_errors)
        for message in errors[:10]:
            log.warning("evaluation sample skipped: %s", message)

    @staticmethod
    def _batch(items: list, indices: list[int], decode_errors: int) -> dict[str, Any]:
        out = _collate(items)
        out["index"] = torch.tensor(indices, dtype=torch.long)
        out["decode_errors"] = decode_errors
        return out


def eval_loader(shards_dir: str | Path | ShardSet, transform: Callable[[torch.Tensor], Any],
                batch_size: int, workers: int = 0, limit: int | None = None, *, rank: int = 0,
                world_size: int = 1) -> DataLoader:
    """Batches `{"image", "label", "index"}` covering this rank's share of the first `limit`
    samples (all by default); the shares of all ranks partition the data."""
    shards = shards_dir if isinstance(shards_dir, ShardSet) else open_shards(shards_dir)
    dataset = EvalStream(shards, transform, batch_size, rank=rank, world_size=world_size,
                         limit=limit)
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      prefetch_factor=2 if workers else None)
