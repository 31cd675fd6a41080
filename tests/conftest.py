"""Shared fixtures: tiny WebDataset shards written directly (no dependency on the converter)."""

from __future__ import annotations

import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("SEED_TRACKING", "0")  # unit tests do not write to MLflow
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_tiny_shards(root: Path, counts: list[int], num_classes: int = 4, size: int = 12,
                      seed: int = 0) -> Path:
    """Shards of random grayscale PNGs whose mean brightness depends on the class; the sample
    with global index i has label i % num_classes and key `s{i:05d}`."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards, index = [], 0
    for shard_no, count in enumerate(counts):
        name = f"shard-{shard_no:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for _ in range(count):
                label = index % num_classes
                pixels = rng.integers(0, 60, (size, size)) + 45 * label
                sink.write({"__key__": f"s{index:05d}", "png": png_bytes(
                    pixels.astype(np.uint8)), "cls": str(label).encode(),
                    "json": json.dumps({"key": f"s.{index}", "line": index + 1}).encode()})
                index += 1
        shards.append({"name": name, "samples": count})
    manifest = {"samples": index, "skipped": [], "num_classes": num_classes, "shards": shards,
                "source": {"path": "synthetic", "bytes": 0, "sha256": ""}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def tiny_shards(tmp_path: Path) -> Path:
    """Three uneven shards, 70 samples, 4 classes."""
    return write_tiny_shards(tmp_path / "shards", [30, 25, 15])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def converted_shards(root: Path, keys: list[str], size: tuple[int, int], seed: int) -> Path:
    """23-row-style TSV of random grayscale PNGs (label = row % 3) through the real converter,
    10 samples a shard; returns the shards directory under `root`."""
    from seed_core.data.convert import convert_tsv_to_shards
    from seed_core.data.tsv import write_tsv

    rng = np.random.default_rng(seed)
    rows = [(key, i % 3, png_bytes(rng.integers(0, 255, size, dtype=np.uint8)))
            for i, key in enumerate(keys)]
    write_tsv(root / "t.tsv", rows)
    convert_tsv_to_shards(root / "t.tsv", root / "shards", shard_size=10, workers=1)
    return root / "shards"


# `make test` runs the suite on two xdist workers, one module at a time on a worker (--dist
# loadscope), so that a module-scoped fixture (the whole pipeline's first run, a SLURM cluster, a
# trained reference) is built once. (xdist's finer --dist loadgroup does not group with pytest 9:
# it renames the items' `_nodeid`, which pytest 9 no longer reads.) Modules go to the workers in
# the collection order (--no-loadscope-reorder), and the slow ones are collected first so that
# neither worker is left with a long tail: the whole-pipeline tests, then the SLURM cluster,
# then the fault-injection modules, then the rest in file order.
SLOW_FIRST = ("e2e", "slurm", "faults")


def _slowness_rank(item: pytest.Item) -> int:
    for rank, marker in enumerate(SLOW_FIRST):
        if item.get_closest_marker(marker) is not None:
            return rank
    return len(SLOW_FIRST)


class _SlowFirst:
    # a plugin of its own so that its hook runs last: after pytest's ordering of the items by
    # fixture scope
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        items.sort(key=_slowness_rank)  # stable: the file order holds within a rank


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_SlowFirst(), "seed-slow-first")
