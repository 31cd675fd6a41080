"""Benchmark of opening an ImageNet-sized shard set (`open_shards`); prints one JSON object.

Builds, in a temporary directory, the files the real reader touches when a shard set is opened
and an epoch planned: a converter-style `manifest.json` (1,001 shards, 1,281,167 samples, 1,000
named classes, each shard's `bytes` and `sha256`), the consolidated sample index `index.bin`
written by the real `seed_core.data.shardset.write_sample_index` from synthetic columns
(ImageNet-style keys `nXXXXXXXX/nXXXXXXXX_N.JPEG`, random labels, tar offsets and sizes of
~110 KB JPEGs), and one empty file per shard: opening a local set only checks that each shard
file exists, and no sample is read here (the loader benchmark reads real ones).

Each repetition runs in a fresh Python process (imports, the page-cache-independent state of
the reader and numpy's allocations do not carry over; the index file itself is in the page cache,
as on a node that opened it before), which times in turn:
- `open_s`: `open_shards(location)` (manifest read and checked, shard files looked up);
- `index_s`: `shards.index`, the memory-mapped index checked against the manifest;
- `steps_s`: `steps_per_epoch(shards, batch)`;
- `plan_s`: epoch 0's order (`epoch_order`, a permutation of every sample), its `EpochPlan` and
  the first batch's samples (positions -> sample -> shard, offset, key), as the loader does;
and the process's peak resident memory growth (VmHWM reset by `clear_refs` after the imports,
minus VmRSS then; pages of the mapped index count), over the whole and up to the index, and its
open files (entries of /proc/self/fd after, minus before).
The report gives the median of each over `--repeat` processes.

    python bench/bench_open_shards.py [--shards 1001 --samples 1281167 --batch 256 --repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name

IMAGENET_SAMPLES = 1_281_167
IMAGENET_SHARDS = 1_001  # 1,280 samples a shard: 1,000 full shards and one of 1,167
TAR_BLOCK = 512


# ------------------------------------------------------------------ the synthetic shard set


def shard_counts(samples: int, shards: int) -> list[int]:
    """`shards` counts adding up to `samples`: full shards of ceil(samples / shards), then the
    rest (1,281,167 over 1,001: 1,000 x 1,280 + 1,167), as a converter with that shard size."""
    size = -(-samples // shards)
    counts = [size] * (samples // size)
    if samples % size:
        counts.append(samples % size)
    if len(counts) != shards:  # e.g. 20 shards of 2,000 samples: spread evenly instead
        counts = [samples // shards + (i < samples % shards) for i in range(shards)]
    return counts


def build_shard_set(root: Path, samples: int, shards: int, classes: int, seed: int = 0) -> dict:
    """Write the synthetic set under `root` (see the module doc); returns its sizes."""
    import numpy as np

    from seed_core.data.shardset import MANIFEST_NAME, SampleIndex, write_sample_index

    rng = np.random.default_rng(seed)
    counts = np.array(shard_counts(samples, shards), dtype=np.int64)
    shard = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    labels = rng.integers(0, classes, samples, dtype=np.int64)
    sizes = rng.integers(20_000, 200_000, samples, dtype=np.int64)  # JPEG bytes, ~110 KB mean
    # each sample is three tar members (image, cls, json): a header block before each, the
    # data padded to whole blocks; the image's data starts one header block into the sample
    blocks = 3 + -(-sizes // TAR_BLOCK) + 1 + 1
    ends = np.cumsum(blocks * TAR_BLOCK)
    starts_of_shard = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sample_start = ends - blocks * TAR_BLOCK
    base = np.repeat(sample_start[starts_of_shard], counts)  # each shard's first sample at 0
    offsets = sample_start - base + TAR_BLOCK
    shard_bytes = np.add.reduceat(blocks * TAR_BLOCK, starts_of_shard) + 2 * TAR_BLOCK
    wnids = [f"n{1_440_764 + 7919 * c:08d}" for c in range(classes)]
    keys = np.array([f"{wnids[c]}/{wnids[c]}_{i}.JPEG".encode()
                     for i, c in enumerate(labels.tolist())], dtype=bytes)
    root.mkdir(parents=True, exist_ok=True)
    index_entry = write_sample_index(root / "index.bin", SampleIndex(
        shard=shard, offsets=offsets, sizes=sizes, labels=labels, keys=keys))
    entries = []
    for i, (count, nbytes) in enumerate(zip(counts.tolist(), shard_bytes.tolist())):
        name = f"shard-{i:06d}.tar"
        (root / name).touch()  # only its existence is checked at open time
        entries.append({"name": name, "samples": count, "bytes": nbytes,
                        "sha256": hashlib.sha256(name.encode()).hexdigest()})  # never verified
    manifest = {"format": "webdataset", "samples": samples, "lines": samples, "skipped": [],
                "num_classes": classes, "class_names": wnids,
                "class_counts": np.bincount(labels, minlength=classes).tolist(),
                "shards": entries, "index": index_entry, "shard_size": int(counts[0]),
                "order": {"shuffled": True, "seed": seed}, "extensions": {"jpg": samples},
                "source": {"path": "synthetic (bench/bench_open_shards.py)", "bytes": 0,
                           "lines": samples}}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return {"samples": samples, "shards": len(counts), "classes": classes,
            "shard_samples": int(counts[0]), "last_shard_samples": int(counts[-1]),
            "key_bytes": int(keys.dtype.itemsize),
            "index_mib": round(index_entry["bytes"] / 2**20, 1),
            "manifest_kib": round((root / MANIFEST_NAME).stat().st_size / 1024, 1),
            "dataset_gib_described": round(float(shard_bytes.sum()) / 2**30, 1)}


# ------------------------------------------------------------------ one repetition (a child)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def child(location: str, batch: int) -> dict:
    """One repetition, in this (fresh) process; returns its figures."""
    import resource

    start = time.perf_counter()
    import numpy as np

    from seed_core.data import open_shards, steps_per_epoch
    from seed_core.data.order import EpochPlan, epoch_order
    import_s = time.perf_counter() - start

    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
        method = "VmHWM (reset by clear_refs after the imports) minus VmRSS then"
        reset = True
    except OSError:
        method = "ru_maxrss minus VmRSS after the imports (an upper bound: no reset)"
        reset = False
    rss_before = _status_kib("VmRSS") or 0
    files_before = _open_files()

    t0 = time.perf_counter()
    shards = open_shards(location)
    t1 = time.perf_counter()
    index = shards.index  # memory-mapped and checked against the manifest
    t2 = time.perf_counter()
    peak_opened = _status_kib("VmHWM") if reset else None
    steps = steps_per_epoch(shards, batch)
    t3 = time.perf_counter()
    order = epoch_order(shards.samples, 0, 0)
    plan = EpochPlan(shards.samples, batch, 1)
    first = order[np.fromiter(plan.positions(0, 0), dtype=np.int64)]
    where = (index.shard[first], index.offsets[first], index.sizes[first])
    first_keys = [index.key(int(i)) for i in first]
    t4 = time.perf_counter()

    peak = _status_kib("VmHWM") if reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(first_keys) == batch and all(len(w) == batch for w in where)
    return {"import_s": import_s, "open_s": t1 - t0, "index_s": t2 - t1, "steps_s": t3 - t2,
            "plan_s": t4 - t3, "total_s": t4 - t0,
            "peak_rss_growth_mib": (peak - rss_before) / 1024,
            "peak_rss_growth_open_index_mib": (None if peak_opened is None
                                               else (peak_opened - rss_before) / 1024),
            "rss_after_mib": (_status_kib("VmRSS") or 0) / 1024,
            "open_files_delta": _open_files() - files_before,
            "samples": shards.samples, "index_samples": int(index.shard.shape[0]),
            "shards": len(shards.names), "steps_per_epoch": steps,
            "first_batch_shards": int(np.unique(where[0]).size), "memory_method": method}


def run_child(location: Path, batch: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(location), "--batch",
                           str(batch)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_open_shards: a repetition failed (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


TIMES = ("import_s", "open_s", "index_s", "steps_s", "plan_s", "total_s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=IMAGENET_SHARDS)
    parser.add_argument("--samples", type=int, default=IMAGENET_SAMPLES)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256, help="global batch of the plan")
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes, >= 1")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batch)))
        return
    if args.repeat < 1 or args.shards < 1 or args.samples < args.shards:
        parser.error("need --repeat >= 1 and --samples >= --shards >= 1")

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench_open_shards_") as tmp:
        root = Path(tmp) / "shards"
        start = time.perf_counter()
        sizes = build_shard_set(root, args.samples, args.shards, min(args.classes, args.samples))
        build_s = time.perf_counter() - start
        runs = [run_child(root, args.batch) for _ in range(args.repeat)]
    for run in runs:
        if run["samples"] != args.samples or run["index_samples"] != args.samples:
            raise SystemExit(f"bench_open_shards: opened {run['samples']} samples "
                             f"({run['index_samples']} in the index), built {args.samples}")

    def median(name: str, digits: int) -> float:
        return round(statistics.median(run[name] for run in runs), digits)

    print(json.dumps({
        "benchmark": "open_shards",
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
        "python": sys.version.split()[0],
        "load_average_at_start": load_at_start,
        "repeat": args.repeat, "batch": args.batch, **sizes,
        "build_s": round(build_s, 1),
        "seconds_median": {name: median(name, 4) for name in TIMES},
        "seconds_max": {name: round(max(run[name] for run in runs), 4) for name in TIMES},
        "peak_rss_growth_mib_median": median("peak_rss_growth_mib", 1),
        "peak_rss_growth_mib_max": round(max(run["peak_rss_growth_mib"] for run in runs), 1),
        # open_shards + the index alone (without the epoch's order): None without clear_refs
        "peak_rss_growth_open_index_mib_median": (
            None if runs[0]["peak_rss_growth_open_index_mib"] is None
            else median("peak_rss_growth_open_index_mib", 1)),
        "rss_after_mib_median": median("rss_after_mib", 1),
        "open_files_delta": max(run["open_files_delta"] for run in runs),
        "steps_per_epoch": runs[0]["steps_per_epoch"],
        "first_batch_shards": runs[0]["first_batch_shards"],
        "opened_samples": runs[0]["samples"],
        "memory_method": runs[0]["memory_method"],
        "page_cache": "warm (the index was just written; no root to drop caches)",
        "shard_files": "empty: only their existence is checked when a local set is opened",
    }, indent=2))


if __name__ == "__main__":
    main()
