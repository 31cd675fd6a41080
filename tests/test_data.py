import datetime
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from conftest import free_port, png_bytes, write_tiny_shards
from seed_core.data.loader import eval_loader, open_shards, steps_per_epoch, train_loader
from seed_core.data.transforms import MultiView, eval_transform, moco_v2_transform


def batches(shards, *, start_step=0, workers=0, rank=0, epoch=0, steps=6, batch_size=8,
            transform=None):
    loader = train_loader(shards, transform or moco_v2_transform(16), batch_size, seed=7,
                          epoch=epoch, rank=rank, steps=steps, start_step=start_step,
                          workers=workers, shuffle_buffer=16)
    return list(loader)


def test_training_epoch_has_exactly_the_requested_steps(tiny_shards: Path) -> None:
    shards = open_shards(tiny_shards)
    out = batches(shards, steps=20)  # more steps than one pass holds: the stream goes on
    assert len(out) == 20
    assert all(b["image"].shape == (8, 3, 16, 16) for b in out)
    assert all(b["label"].shape == (8,) for b in out)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_resumes_mid_epoch_with_identical_batches(tiny_shards: Path,
                                                           workers: int) -> None:
    shards = open_shards(tiny_shards)
    full = batches(shards, workers=workers)
    for start in (1, 3, 5):
        resumed = batches(shards, workers=workers, start_step=start)
        assert len(resumed) == len(full) - start
        for a, b in zip(full[start:], resumed):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_training_order_depends_on_epoch_rank_and_seed(tiny_shards: Path) -> None:
    shards = open_shards(tiny_shards)
    base = batches(shards)
    assert torch.equal(base[0]["image"], batches(shards)[0]["image"])  # reproducible
    assert not torch.equal(base[0]["image"], batches(shards, epoch=1)[0]["image"])
    assert not torch.equal(base[0]["image"], batches(shards, rank=1)[0]["image"])


def test_multi_view_batches(tiny_shards: Path) -> None:
    shards = open_shards(tiny_shards)
    view = MultiView([moco_v2_transform(16), moco_v2_transform(8), moco_v2_transform(8)])
    out = batches(shards, steps=2, transform=view)
    assert [v.shape for v in out[0]["image"]] == [(8, 3, 16, 16), (8, 3, 8, 8), (8, 3, 8, 8)]


def test_steps_per_epoch_drops_the_last_partial_batch(tiny_shards: Path) -> None:
    shards = open_shards(tiny_shards)
    assert steps_per_epoch(shards, 16) == 70 // 16
    with pytest.raises(ValueError, match="cannot fill one global batch of 128"):
        steps_per_epoch(shards, 128)


@pytest.mark.parametrize("workers,limit", [(0, None), (2, None), (2, 40)])
def test_evaluation_sees_every_sample_once_in_order(tiny_shards: Path, workers: int,
                                                    limit) -> None:
    loader = eval_loader(tiny_shards, eval_transform(16), batch_size=16, workers=workers,
                         limit=limit)
    index = torch.cat([b["index"] for b in loader])
    labels = torch.cat([b["label"] for b in loader])
    expected = 70 if limit is None else limit
    assert sorted(index.tolist()) == list(range(expected))
    assert torch.equal(labels, index % 4)  # labels travel with their sample


def test_corrupt_image_is_counted_not_fatal(tmp_path: Path) -> None:
    root = write_tiny_shards(tmp_path / "s", [20])
    with wds.TarWriter(str(root / "shard-000001.tar")) as sink:
        sink.write({"__key__": "bad", "png": b"\x89PNG not really", "cls": b"1"})
        sink.write({"__key__": "good", "png": png_bytes(np.zeros((12, 12), np.uint8)),
                    "cls": b"2"})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"].append({"name": "shard-000001.tar", "samples": 2})
    (root / "manifest.json").write_text(json.dumps(manifest))
    shards = open_shards(root)
    out = batches(shards, steps=10, batch_size=4)
    assert len(out) == 10 and max(b["decode_errors"] for b in out) >= 1
    index = torch.cat([b["index"] for b in eval_loader(root, eval_transform(16), 8)])
    assert sorted(index.tolist()) == list(range(20)) + [21]  # 20 is the corrupt one


def test_missing_manifest_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="stages/shards.py"):
        open_shards(tmp_path)


def _two_rank_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    shards = open_shards(root)
    steps = steps_per_epoch(shards, 8 * world)
    ran = 0
    for batch in train_loader(shards, moco_v2_transform(16), 8, seed=1, epoch=0, rank=rank,
                              steps=steps, workers=1):
        # a collective per step, as DDP does: a rank with fewer steps would hang the other
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == world
        ran += 1
    seen = torch.cat([b["index"] for b in eval_loader(root, eval_transform(16), 8, workers=1,
                                                      rank=rank, world_size=world)])
    everything: list = [None] * world
    dist.all_gather_object(everything, seen.tolist())
    if rank == 0:
        Path(out).write_text(json.dumps({"steps": steps, "ran": ran, "seen": everything}))
    dist.barrier()
    dist.destroy_process_group()


def test_two_gloo_ranks_run_equal_steps_and_partition_evaluation(tmp_path: Path) -> None:
    # shards deliberately uneven: rank 0 gets 2 shards (45 samples), rank 1 gets 1 (25)
    root = write_tiny_shards(tmp_path / "s", [30, 25, 15])
    out = tmp_path / "result.json"
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(root), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert result["ran"] == result["steps"] == 70 // 16
    seen = result["seen"]
    assert sorted(seen[0] + seen[1]) == list(range(70))  # no sample missing, none twice
    assert set(seen[0]).isdisjoint(seen[1])
