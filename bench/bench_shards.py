"""Benchmark the TSV -> WebDataset conversion (`convert_tsv_to_shards`); prints JSON.

Writes a synthetic SEED TSV of JPEG images (ImageNet-like: a few hundred pixels a side, so the
decode check dominates as it does on real data), then converts it with 1 worker and with every
CPU, in a seeded global permutation (the default) and in the TSV's order (`shuffle_seed=None`:
the sequential writer of before), `--repeats` times each. Reports median records/s, the cost of
the global shuffle, the speed-up of the worker pool, and the peak resident memory of the
converting process and of its largest worker (both must stay flat whatever the file size: lines
are read one at a time at their offsets).

    python bench/bench_shards.py [--records 2000 --side 256 --repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from seed_core.data.convert import convert_tsv_to_shards
from seed_core.data.tsv import write_tsv


def synthetic_rows(records: int, side: int, seed: int):
    """`(key, label, JPEG bytes)`: smooth random images (JPEG-compressible like photos)."""
    rng = np.random.default_rng(seed)
    for i in range(records):
        small = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((side, side), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        yield f"img_{i:07d}.JPEG", i % 1000, buffer.getvalue()


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory of this process (or, with RUSAGE_CHILDREN, its largest worker)."""
    return resource.getrusage(who).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / "train.tsv"
        write_tsv(tsv, synthetic_rows(args.records, args.side, seed=0))
        rss_before = peak_rss_mib()
        medians = {}
        for order, seed in (("shuffled", 0), ("tsv_order", None)):
            for workers in sorted({1, cpus}):
                rates = []
                for repeat in range(args.repeats):
                    start = time.perf_counter()
                    manifest = convert_tsv_to_shards(
                        tsv, Path(tmp) / f"out_{order}_{workers}_{repeat}",
                        shard_size=args.shard_size, workers=workers, shuffle_seed=seed)
                    rates.append(manifest["lines"] / (time.perf_counter() - start))
                    assert manifest["samples"] == args.records and not manifest["skipped"]
                medians[(order, workers)] = statistics.median(rates)
        print(json.dumps({
            "records": args.records, "image_side": args.side,
            "tsv_mib": round(tsv.stat().st_size / 2**20, 1), "cpus": cpus,
            "records_per_s_median": {f"{order}_workers_{w}": round(r, 1)
                                     for (order, w), r in medians.items()},
            "shuffled_over_tsv_order": {f"workers_{w}": round(medians[("shuffled", w)]
                                                              / medians[("tsv_order", w)], 3)
                                        for w in sorted({1, cpus})},
            "speedup_all_workers_over_1": round(medians[("shuffled", cpus)]
                                                / medians[("shuffled", 1)], 2),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "peak_rss_mib_largest_worker": round(peak_rss_mib(resource.RUSAGE_CHILDREN), 1),
            "peak_rss_growth_during_conversion_mib": round(peak_rss_mib() - rss_before, 1),
        }, indent=2))


if __name__ == "__main__":
    main()
