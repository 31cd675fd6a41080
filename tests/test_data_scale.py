"""The data path at scale, with faults injected from outside the production code: open-file
limits, stalled transforms, truncated shards, ranks that opened different manifests, thread
counts; and the epoch order's own algorithm (pinned) and its class mixing."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import png_bytes, write_tiny_shards
from seed_core.data import eval_loader, open_shards, steps_per_epoch, train_loader
from seed_core.data.loader import (LoaderTimeout, ManifestMismatch, check_same_manifest,
                                   manifest_digest)
from seed_core.data.order import GAMMA, epoch_order, stream_seed
from seed_core.data.transforms import eval_transform, ssl_transform

ROOT = Path(__file__).resolve().parents[1]
MASK = (1 << 64) - 1

# --- the epoch order ------------------------------------------------------------------------


def naive_epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order in plain Python integers: SplitMix64 over a Weyl sequence, keys sorted."""
    stream = stream_seed("epoch order", seed, epoch)
    keys = []
    for i in range(n):
        z = (stream + (i + 1) * GAMMA) & MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        keys.append(z ^ (z >> 31))
    return sorted(range(n), key=keys.__getitem__)


def test_the_epoch_order_is_pinned_and_matches_a_naive_reference() -> None:
    # a silent change of the algorithm (or of a library under it) changes every run's batches
    assert epoch_order(1000, 0, 0)[:10].tolist() == [130, 489, 439, 412, 457, 616, 771, 875,
                                                     50, 117]
    for n, seed, epoch in [(1, 0, 0), (257, 3, 1), (1000, 0, 0)]:
        assert epoch_order(n, seed, epoch).tolist() == naive_epoch_order(n, seed, epoch)


def old_block_order(n: int, seed: int, epoch: int, block: int = 64,
                    window: int = 8192) -> np.ndarray:
    """805c760's order (64-sample blocks shuffled, then 8,192-sample windows): the control."""
    rng = np.random.default_rng(stream_seed("epoch order", seed, epoch))
    order = (rng.permutation(-(-n // block))[:, None] * block + np.arange(block)).ravel()
    order = order[order < n]
    for start in range(0, n, window):
        rng.shuffle(order[start:start + window])
    return order


def mean_classes_per_batch(order: np.ndarray, labels: np.ndarray, batch: int = 256) -> float:
    steps = len(order) // batch
    rows = labels[order[:steps * batch]].reshape(steps, batch)
    return float(np.mean([len(np.unique(row)) for row in rows]))


@pytest.mark.parametrize("classes,per_class,expected,at_least", [
    (10, 1000, 10.0, 9.99),  # every batch of 256 holds all 10 classes
    (1000, 50, 226.5, 215),  # 1000 x (1 - P(a class misses a batch)) = 226.5 for uniform sampling
])
def test_batches_of_class_sorted_shards_mix_classes_as_uniform_sampling(
        classes, per_class, expected, at_least) -> None:
    labels = np.repeat(np.arange(classes), per_class)  # shards written in class order
    n = len(labels)
    # expected distinct classes in a uniform sample of 256 without replacement
    miss = np.exp(np.sum(np.log(1 - per_class / (n - np.arange(256)))))
    assert classes * (1 - miss) == pytest.approx(expected, abs=0.1)
    for epoch in range(2):
        assert mean_classes_per_batch(epoch_order(n, 0, epoch), labels) >= at_least
    if classes == 1000:  # the block shuffle mixed far worse: 150 classes here, ~107 at 1.28 M
        assert mean_classes_per_batch(old_block_order(n, 0, 0), labels) < 200


# --- bounded open files ---------------------------------------------------------------------

READ_ALL = textwrap.dedent("""
    import json, resource, sys
    from seed_core.data import eval_loader, open_shards, steps_per_epoch, train_loader
    from seed_core.data import shardset
    from seed_core.data.transforms import eval_transform

    shardset.MAX_OPEN_SHARDS = int(sys.argv[2])
    shards = open_shards(sys.argv[1])
    steps = steps_per_epoch(shards, 16)
    train = [key for batch in train_loader(shards, eval_transform(8), 16, seed=0, epoch=0,
                                           rank=0, world_size=1, steps=steps, workers=2)
             for key in batch["key"] + batch["bad"]]
    evaluated = eval_loader(shards, eval_transform(8), 16, workers=0)
    index = [i for batch in evaluated for i in batch["index"].tolist()]
    print(json.dumps({"train": train, "eval": index, "bad": evaluated.bad,
                      "limit": resource.getrlimit(resource.RLIMIT_NOFILE)}))
""")


def read_everything_under_a_file_limit(shards: Path, max_open: int, limit: int = 96,
                                       timeout: float = 300) -> subprocess.CompletedProcess:
    def cap() -> None:  # in the child, before Python starts: the limit a cluster imposes
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return subprocess.run([sys.executable, "-c", READ_ALL, str(shards), str(max_open)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          preexec_fn=cap)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("many") / "shards", [2] * 400, size=8)


def test_400_shards_read_under_a_96_file_limit(many_shards) -> None:
    done = read_everything_under_a_file_limit(many_shards, max_open=32)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["limit"] == [96, 96]
    index = open_shards(many_shards).index
    everything = sorted(index.key(i) for i in range(800))
    assert sorted(out["train"]) == everything  # 50 steps x 16: every sample exactly once
    assert out["eval"] == list(range(800)) and out["bad"] == []


def test_without_the_bound_the_same_epoch_runs_out_of_files(many_shards) -> None:
    # out of files, a worker fails reading a shard, or sending a batch (its storage passes as a
    # file descriptor): both end the run in seconds; the second used to hang it (the test below)
    done = read_everything_under_a_file_limit(many_shards, max_open=1000, timeout=120)
    assert done.returncode != 0
    assert "Too many open files" in done.stderr


def test_the_reader_closes_the_least_recently_used_shard(many_shards) -> None:
    from seed_core.data.shardset import SampleReader

    shards = open_shards(many_shards)
    reader = SampleReader(shards, max_open=3)
    first = reader.read(0)
    for i in (2, 4, 0, 6):  # shards 1, 2, 0 (kept: just used), 3 (evicts shard 1)
        reader.read(i)
    assert reader.open_files == 3 and list(reader._files) == [2, 0, 3]
    assert reader.read(0) == first
    reader.close()
    assert reader.open_files == 0


HOG_THE_WORKERS_FILES = textwrap.dedent("""
    import sys, time
    import torch
    from seed_core.data import open_shards, train_loader
    from seed_core.data.transforms import eval_transform

    held = []
    view = eval_transform(8)
    view(torch.zeros(3, 12, 12, dtype=torch.uint8))  # its lazy imports, before files run out

    def hog(image):  # a user's transform that leaks files: the worker ends up with none free
        while True:
            try:
                held.append(open("/dev/null"))
            except OSError:
                break
        return view(image)

    shards = open_shards(sys.argv[1])
    start = time.monotonic()
    try:
        next(iter(train_loader(shards, hog, 4, seed=0, epoch=0, rank=0, world_size=1, steps=2,
                               workers=1)))
    finally:
        print(f"after {time.monotonic() - start:.1f} s", file=sys.stderr)
""")


def test_a_worker_that_cannot_send_its_batch_fails_the_loader_at_once(tmp_path) -> None:
    # out of files, the worker cannot pass the batch's storage (a file descriptor) to its rank:
    # the multiprocessing queue's feeder thread used to print that and drop the batch, and the
    # rank waited for the loader's timeout (10 min), told of a stuck worker
    one_shard = write_tiny_shards(tmp_path / "shards", [40])  # the worker opens it before hogging

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    done = subprocess.run([sys.executable, "-c", HOG_THE_WORKERS_FILES, str(one_shard)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, preexec_fn=cap)
    assert done.returncode != 0
    assert "Too many open files" in done.stderr
    assert "loader worker could not send a batch" in done.stderr, done.stderr[-3000:]
    assert float(done.stderr.rsplit("after ", 1)[1].split()[0]) < 30


# --- the loader's timeout -------------------------------------------------------------------


class SlowTransform:
    """A user's transform that hangs (picklable, for loader workers)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        time.sleep(3)
        return eval_transform(8)(image)


def test_a_stalled_worker_raises_an_error_naming_what_it_waited_for(tiny_shards) -> None:
    shards = open_shards(tiny_shards)
    loader = train_loader(shards, SlowTransform(), 4, seed=0, epoch=2, rank=1, world_size=2,
                          steps=5, start_step=3, workers=1, timeout=0.5)
    with pytest.raises(LoaderTimeout, match=rf"no batch for 0.5 s: {tiny_shards}: training "
                                            rf"batch of rank 1/2 at epoch 2 step 3, from 1 "
                                            rf"loader worker\(s\)"):
        next(iter(loader))
    evaluated = eval_loader(shards, SlowTransform(), 16, workers=2, timeout=0.5)
    with pytest.raises(LoaderTimeout, match=r"evaluation batch 1 of 5 \(samples 0-15\) of rank "
                                            r"0/1, from 2 loader worker"):
        list(evaluated)


# --- the same manifest on every rank --------------------------------------------------------


def test_ranks_that_opened_different_manifests_are_refused(tiny_shards, tmp_path) -> None:
    shards = open_shards(tiny_shards)
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in tiny_shards.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    elsewhere = open_shards(copy)
    # the same shards at another location: one digest
    check_same_manifest(shards, lambda mine: [mine, (manifest_digest(elsewhere), "b:/copy")])
    other = open_shards(write_tiny_shards(tmp_path / "other", [30, 25, 16]))
    ours, theirs = manifest_digest(shards), manifest_digest(other)
    assert ours != theirs

    def gather(mine):  # a fake all_gather_objects over three ranks; rank 2 differs
        return [mine, mine, (theirs, "node7:/data/other")]

    with pytest.raises(ManifestMismatch, match=rf"rank 0 read manifest {ours[:16]} at "
                                               rf"[^ ]+:{tiny_shards}, rank 2 read manifest "
                                               rf"{theirs[:16]} at node7:/data/other"):
        check_same_manifest(shards, gather)


# --- unreadable samples: replaced from the remainder -----------------------------------------


def truncate_at(shards, victim: int) -> list[int]:
    """Cut the victim's shard inside the victim's image: it and the shard's later samples are
    unreadable (the `ShardSet`'s index was read before). Returns their indices."""
    index = shards.index
    shard = int(index.shard[victim])
    with open(shards.shard_path(shard), "r+b") as f:
        f.truncate(int(index.offsets[victim]) + 5)
    return [i for i in np.flatnonzero(index.shard == shard).tolist()
            if index.offsets[i] >= index.offsets[victim]]


def one_epoch(shards, global_batch: int, workers: int = 2) -> list[dict]:
    return list(train_loader(shards, eval_transform(8), global_batch, seed=0, epoch=0, rank=0,
                             world_size=1, steps=steps_per_epoch(shards, global_batch),
                             workers=workers))


def test_a_truncated_shard_is_replaced_from_the_remainder_without_duplicates(tmp_path) -> None:
    root = write_tiny_shards(tmp_path / "shards", [10] * 8)  # 80 samples: 72 read, 8 left out
    order = epoch_order(80, 0, 0)
    shards = open_shards(root)
    index = shards.index
    last_of = {int(s): int(np.flatnonzero(index.shard == s)[-1]) for s in range(8)}
    # the last sample of a shard that epoch 0 reads
    victim = next(last_of[int(index.shard[i])] for i in order[:72]
                  if last_of[int(index.shard[i])] in order[:72])
    assert truncate_at(shards, victim) == [victim]
    batches = one_epoch(shards, 12)
    keys = [k for b in batches for k in b["key"]]
    bad = [m for b in batches for m in b["bad"]]
    assert len(bad) == 1 and bad[0].startswith(f"{index.key(victim)}: ") and "cut short" in bad[0]
    assert len(keys) == 72 and len(set(keys)) == 72 and index.key(victim) not in keys
    read_at_own_place = {index.key(int(i)) for i in order[:72]}
    (replacement,) = set(keys) - read_at_own_place
    assert replacement in {index.key(int(i)) for i in order[72:]}


def test_replacements_are_never_samples_the_epoch_reads(tmp_path) -> None:
    root = write_tiny_shards(tmp_path / "shards", [10] * 8)
    shards = open_shards(root)
    index = shards.index
    unreadable = truncate_at(shards, int(np.flatnonzero(index.shard == 3)[6]))  # 4 samples
    order = epoch_order(80, 0, 0)
    batches = one_epoch(shards, 12)
    keys = [k for b in batches for k in b["key"]]
    bad = [m.split(":")[0] for b in batches for m in b["bad"]]
    read_at_own_place = [index.key(int(i)) for i in order[:72] if i not in unreadable]
    replacements = [k for k in keys if k not in set(read_at_own_place)]
    assert len(keys) == 72 and sorted(set(keys) - set(replacements)) == sorted(read_at_own_place)
    assert set(replacements) <= {index.key(int(i)) for i in order[72:]}
    assert len(replacements) == sum(int(i) in unreadable for i in order[:72])
    # every read is counted: a sample read, or an unreadable one reported (the epoch's own
    # unreadable samples, and any unreadable remainder sample tried as a replacement)
    own = [index.key(int(i)) for i in order[:72] if i in unreadable]
    tried = [index.key(int(i)) for i in order[72:] if i in unreadable]
    assert sorted([k for k in bad if k in own]) == sorted(own)
    assert set(bad) - set(own) <= set(tried)


def test_without_a_remainder_a_duplicate_replaces_and_is_augmented_anew(tmp_path) -> None:
    root = write_tiny_shards(tmp_path / "shards", [10] * 8, size=16)  # 80 = 5 x 16: none left
    shards = open_shards(root)
    index = shards.index
    order = epoch_order(80, 0, 0)
    victim = int(np.flatnonzero(index.shard == int(index.shard[order[0]]))[-1])
    truncate_at(shards, victim)
    transform = ssl_transform("moco_v2", 16)
    batches = list(train_loader(shards, transform, 16, seed=0, epoch=0, rank=0, world_size=1,
                                steps=5, workers=0))
    keys = [k for b in batches for k in b["key"]]
    images = torch.cat([b["image"] for b in batches])
    assert len(keys) == 80 and sum(len(b["bad"]) for b in batches) == 1
    (twice,) = [k for k in set(keys) if keys.count(k) == 2]
    first, second = [i for i, k in enumerate(keys) if k == twice]
    assert not torch.equal(images[first], images[second])


# --- the same pixels for any worker and thread count -----------------------------------------


def write_photo_like_shards(root: Path, count: int = 8, size: int = 300) -> Path:
    import webdataset as wds

    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    with wds.TarWriter(str(root / "shard-000000.tar")) as sink:
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            sink.write({"__key__": f"p{i:03d}", "png": png_bytes(pixels),
                        "cls": str(i % 2).encode()})
    (root / "manifest.json").write_text(json.dumps(
        {"samples": count, "skipped": [], "num_classes": 2,
         "shards": [{"name": "shard-000000.tar", "samples": count}]}))
    return root


class ParallelReduction:
    """A user's transform whose float result depends on the torch thread count: a parallel
    reduction (a mean over 4.3 M values) rounds differently when split over 2 threads."""

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):  # a decoded PIL image
            image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        x = image.float() / 255
        big = torch.nn.functional.interpolate(x[None], size=(1200, 1200), mode="nearest")[0]
        return x - big.mean()


def under_threads(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("transform", [ssl_transform("moco_v2", 224), ParallelReduction()],
                         ids=["moco_v2-224", "parallel-reduction"])
def test_views_are_identical_for_any_worker_and_thread_count(tmp_path, transform) -> None:
    shards = open_shards(write_photo_like_shards(tmp_path / "photos"))

    def views(workers: int) -> torch.Tensor:
        return torch.cat([b["image"] for b in train_loader(
            shards, transform, 4, seed=0, epoch=0, rank=0, world_size=1, steps=2,
            workers=workers)])

    in_main = under_threads(2, lambda: (views(0), torch.get_num_threads()))
    assert in_main[1] == 2  # the caller's thread count is restored
    assert torch.equal(in_main[0], views(2))  # workers run on one thread each


def test_the_control_transform_depends_on_the_thread_count() -> None:
    """Without the loader's single thread, the test above would see different pixels."""
    image = torch.randint(0, 256, (3, 300, 300), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))  # what a PIL image gives
    one, two = (under_threads(n, lambda: ParallelReduction()(image)) for n in (1, 2))
    assert not torch.equal(one, two)
