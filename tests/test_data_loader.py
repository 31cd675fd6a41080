"""The training and evaluation loaders: one shuffled pass per epoch, split across ranks and
workers, the same global batches for any world size, exact mid-epoch resume, and the plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import png_bytes
from seed_core.data import eval_loader, open_shards, steps_per_epoch, train_loader
from seed_core.data.convert import convert_tsv_to_shards
from seed_core.data.loader import training_batches
from seed_core.data.order import EpochPlan, epoch_order
from seed_core.data.plan import epoch_plan, mixing
from seed_core.data.transforms import MultiView, eval_transform, moco_v2_transform
from seed_core.data.tsv import write_tsv

CLASSES, PER_CLASS = 5, 25  # 125 samples: with a global batch of 12, 10 steps and 5 left out
GLOBAL_BATCH = 12
SEED = 3


def class_sorted_rows(classes: int = CLASSES, per_class: int = PER_CLASS, size: int = 10):
    """Rows sorted by class, as SEED-format ImageNet TSVs are; keys with slashes and dots."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            pixels = (rng.integers(0, 50, (size, size)) + 40 * c).astype(np.uint8)
            yield f"n{c:03d}/img_{i:03d}.JPEG", c, png_bytes(pixels)


@pytest.fixture(scope="module")
def sorted_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sorted")
    write_tsv(root / "train.tsv", class_sorted_rows())
    convert_tsv_to_shards(root / "train.tsv", root / "shards", shard_size=20, workers=1)
    return root / "shards"


def epoch_batches(shards, *, world_size: int, workers: int, epoch: int = 0, start_step: int = 0,
                  transform=None) -> list[list[dict]]:
    """`[step][rank]` batches of one epoch, every rank's loader run in this process."""
    shard_set = open_shards(shards)
    steps = steps_per_epoch(shard_set, GLOBAL_BATCH)
    per_rank = [list(train_loader(shard_set, transform or moco_v2_transform(8),
                                  GLOBAL_BATCH // world_size, seed=SEED, epoch=epoch, rank=rank,
                                  world_size=world_size, steps=steps, start_step=start_step,
                                  workers=workers))
                for rank in range(world_size)]
    return [list(step) for step in zip(*per_rank)]


def global_keys(batches: list[list[dict]]) -> list[list[str]]:
    return [[key for part in step for key in part["key"]] for step in batches]


def global_images(batches: list[list[dict]]) -> list[torch.Tensor]:
    return [torch.cat([part["image"] for part in step]) for step in batches]


@pytest.fixture(scope="module")
def reference(sorted_shards) -> list[list[dict]]:
    return epoch_batches(sorted_shards, world_size=1, workers=0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_same_global_batches_for_any_world_size_and_workers(sorted_shards, reference,
                                                           world_size, workers) -> None:
    batches = epoch_batches(sorted_shards, world_size=world_size, workers=workers)
    assert len(batches) == 125 // GLOBAL_BATCH
    assert global_keys(batches) == global_keys(reference)
    for mine, ref in zip(global_images(batches), global_images(reference)):
        assert torch.equal(mine, ref)  # the same augmentation: seeded per sample
    for step in batches:
        assert [len(part["key"]) for part in step] == [GLOBAL_BATCH // world_size] * world_size
        assert all(part["image"].shape[1:] == (3, 8, 8) for part in step)


def test_an_epoch_is_one_pass_without_repeats(sorted_shards, reference) -> None:
    keys = [k for step in global_keys(reference) for k in step]
    assert len(keys) == len(set(keys)) == 120  # 125 samples, 5 left out: less than one batch
    everything = {key for key, _, _ in class_sorted_rows()}
    left_out = everything - set(keys)
    assert len(left_out) == 125 % GLOBAL_BATCH
    # the epoch's order is a permutation of every sample; the dropped tail changes each epoch
    shards = open_shards(sorted_shards)
    tails = {tuple(sorted(epoch_order(125, SEED, e)[120:].tolist())) for e in range(6)}
    assert len(tails) == 6
    assert sorted(epoch_order(125, SEED, 4).tolist()) == list(range(125))
    index_keys = [shards.index.key(i) for i in range(125)]
    assert sorted(index_keys) == sorted(everything)


def test_every_epoch_has_its_own_order(sorted_shards, reference) -> None:
    second = epoch_batches(sorted_shards, world_size=1, workers=0, epoch=1)
    assert global_keys(second) != global_keys(reference)
    first = [k for step in global_keys(reference) for k in step]
    assert len(set(first) & {k for step in global_keys(second) for k in step}) >= 110


def test_labels_travel_with_their_keys(reference) -> None:
    for step in reference:
        for part in step:
            assert part["label"].tolist() == [int(k[1:4]) for k in part["key"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_the_middle_of_an_epoch(sorted_shards, reference, workers) -> None:
    for start in (1, 4, 9):
        resumed = epoch_batches(sorted_shards, world_size=3, workers=workers, start_step=start)
        assert global_keys(resumed) == global_keys(reference)[start:]
        for mine, ref in zip(global_images(resumed), global_images(reference)[start:]):
            assert torch.equal(mine, ref)


def test_class_mixing_is_close_to_uniform_sampling(sorted_shards) -> None:
    shards = open_shards(sorted_shards)
    plan = epoch_plan(shards, GLOBAL_BATCH, world_size=1, workers=0, epoch=0, seed=SEED)
    assert 0.5 < plan["mixing"]["ratio"] < 1.6
    # against the same data sorted by class, read in order: far from uniform
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)[:120].reshape(10, GLOBAL_BATCH)
    counts = np.stack([np.bincount(row, minlength=CLASSES) for row in labels])
    assert mixing(counts, np.full(CLASSES, 0.2), 125)["ratio"] > 5


def test_shards_of_a_class_sorted_tsv_are_class_mixed(sorted_shards, tmp_path) -> None:
    """The converter shuffles globally unless told to keep the TSV's order (the epoch order
    mixes classes either way: tests/test_data_scale.py)."""
    shards = open_shards(sorted_shards)
    per_shard = np.split(shards.index.labels, np.cumsum(shards.counts)[:-1])
    assert all(len(set(labels.tolist())) >= 3 for labels in per_shard)
    ordered = convert_tsv_to_shards(sorted_shards.parent / "train.tsv", tmp_path / "ordered",
                                    shard_size=20, workers=1, shuffle_seed=None)
    assert ordered["order"] == {"shuffled": False}
    kept = open_shards(tmp_path / "ordered")
    assert all(len(set(labels.tolist())) <= 2 for labels in
               np.split(kept.index.labels, np.cumsum(kept.counts)[:-1]))


def test_multi_view_batches(sorted_shards) -> None:
    view = MultiView([moco_v2_transform(8), moco_v2_transform(4), moco_v2_transform(4)])
    batch = epoch_batches(sorted_shards, world_size=2, workers=0, transform=view)[0][0]
    assert [v.shape for v in batch["image"]] == [(6, 3, 8, 8), (6, 3, 4, 4), (6, 3, 4, 4)]


def test_the_training_loader_leaves_the_global_rng_alone(sorted_shards) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    epoch_batches(sorted_shards, world_size=1, workers=0)
    assert torch.equal(torch.rand(3), expected)


def test_loader_checks_its_arguments(sorted_shards) -> None:
    shards = open_shards(sorted_shards)
    with pytest.raises(ValueError, match="global batch 10 is not divisible by the world size 3"):
        EpochPlan(125, 10, 3)
    with pytest.raises(ValueError, match="125 samples cannot fill one global batch of 128"):
        steps_per_epoch(shards, 128)
    with pytest.raises(ValueError, match=r"steps 0\.\.11 outside the epoch's 10 steps"):
        train_loader(shards, eval_transform(8), 12, seed=0, epoch=0, rank=0, world_size=1,
                     steps=11)


# --- the plan -----------------------------------------------------------------------------

@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2), (3, 2)])
def test_the_loader_follows_the_plan(sorted_shards, world_size, workers) -> None:
    shards = open_shards(sorted_shards)
    plan = epoch_plan(shards, GLOBAL_BATCH, world_size, workers, epoch=2, seed=SEED,
                      start_step=3)
    batches = epoch_batches(sorted_shards, world_size=world_size, workers=workers, epoch=2,
                            start_step=3)
    planned = {(b["step"], b["rank"]): b for b in plan["batches"]}
    for offset, step in enumerate(batches):
        for rank, part in enumerate(step):
            entry = planned[(3 + offset, rank)]
            assert part["key"] == entry["keys"]
            assert part["worker"] == entry["worker"]
            assert np.bincount(part["label"].numpy(), minlength=CLASSES).tolist() == \
                entry["class_counts"]
    assert len(batches) == plan["steps"] - 3 == 7


def test_the_plan_names_the_worker_of_later_epochs(sorted_shards) -> None:
    """One loader spans a run's epochs and hands batches to its workers in turn, so the worker
    of a step depends on where the loader started, not on the step alone."""
    shards = open_shards(sorted_shards)
    loader = training_batches(shards, eval_transform(8), GLOBAL_BATCH, seed=SEED, rank=0,
                              world_size=1, start=(0, 7), stop=(2, 4), workers=2)
    seen = [(batch["key"], batch["worker"]) for batch in loader]
    planned = []
    for epoch, first in [(0, 7), (1, 0), (2, 0)]:
        plan = epoch_plan(shards, GLOBAL_BATCH, 1, 2, epoch=epoch, seed=SEED,
                          start_step=first, loader_start=(0, 7))
        planned += [(b["keys"], b["worker"]) for b in plan["batches"]]
    assert seen == planned[:len(seen)] and len(seen) == 3 + 10 + 4
    # the loader's 4th batch (epoch 1, step 0) comes from worker 1, its 5th from worker 0 ...
    assert [w for _, w in seen[3:5]] == [1, 0]
    # ... where a worker counted from the epoch's first step (the old column) says 0, 1
    assert [step % 2 for step in range(2)] != [w for _, w in seen[3:5]]


def test_plan_command_prints_json_and_text(sorted_shards) -> None:
    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "seed_core.data", "plan", "--shards",
                               str(sorted_shards), "--batch-size", "12", "--world-size", "3",
                               "--workers", "2", "--epoch", "1", "--seed", str(SEED), *extra],
                              capture_output=True, text=True, timeout=60)

    done = run("--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["steps"] == 10 and plan["batch_size"] == 4 and len(plan["left_out"]) == 5
    assert len(plan["batches"]) == 30 and plan["batches"][1]["rank"] == 1
    assert plan["batches"][0]["keys"] == epoch_batches(
        sorted_shards, world_size=3, workers=0, epoch=1)[0][0]["key"]
    text = run()
    assert "global batch 12 = 3 rank(s) x 4, 10 steps" in text.stdout
    assert "step     9 rank   2 (worker 1): classes" in text.stdout
    resumed = json.loads(run("--json", "--loader-start", "0:3").stdout)
    assert [b["worker"] for b in resumed["batches"][:6:3]] == [(10 - 3) % 2, (11 - 3) % 2]
    assert "taking batches in turn from the loader's start 0:0" in text.stdout
    bad = run("--world-size", "5")
    assert bad.returncode == 2 and "not divisible by the world size 5" in bad.stderr


# --- unreadable samples and evaluation ------------------------------------------------------

def corrupt_one_image(shards_dir: Path, victim: int = 7) -> str:
    """Overwrite one sample's PNG bytes in place (its shard and index stay consistent)."""
    shards = open_shards(shards_dir)
    index = shards.index
    path = shards.shard_path(int(index.shard[victim]))
    with open(path, "r+b") as f:
        f.seek(int(index.offsets[victim]) + 20)
        f.write(b"\x00" * 16)
    return index.key(victim)


def test_a_corrupt_sample_is_replaced_and_counted(sorted_shards, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in sorted_shards.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    order = epoch_order(125, SEED, 0)
    victim = corrupt_one_image(broken, int(order[7]))  # a sample that epoch 0 reads
    batches = epoch_batches(broken, world_size=1, workers=2)
    flat = [part for step in batches for part in step]
    bad = [m for part in flat for m in part["bad"]]
    assert len(bad) == 1 and bad[0].startswith(f"{victim}: not a decodable image")
    assert all(len(part["key"]) == GLOBAL_BATCH for part in flat)  # sizes kept
    keys = [k for part in flat for k in part["key"]]
    assert victim not in keys and len(set(keys)) == len(keys) == 120
    # its replacement is a sample of the epoch's left-out remainder
    index = open_shards(broken).index
    assert keys[7] in {index.key(int(i)) for i in order[120:]}
    evaluated = eval_loader(open_shards(broken), eval_transform(8), 16, workers=2)
    index = torch.cat([b["index"] for b in evaluated])
    assert index.numel() == 124 and len(evaluated.bad) == 1 and victim in evaluated.bad[0]


@pytest.mark.parametrize("world_size,workers,limit", [(1, 0, None), (3, 2, None), (2, 2, 50)])
def test_evaluation_sees_every_sample_once_in_order(sorted_shards, world_size, workers,
                                                    limit) -> None:
    shards = open_shards(sorted_shards)
    parts = [list(eval_loader(shards, eval_transform(8), 16, workers, limit, rank=r,
                              world_size=world_size)) for r in range(world_size)]
    index = torch.cat([b["index"] for part in parts for b in part])
    expected = 125 if limit is None else limit
    assert index.tolist() == list(range(expected))  # contiguous parts, in rank order
    labels = torch.cat([b["label"] for part in parts for b in part])
    assert torch.equal(labels, torch.from_numpy(shards.index.labels[:expected]))
