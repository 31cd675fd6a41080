"""DVC stage `shards`: convert a SEED-format TSV into WebDataset shards.

    python stages/shards.py --tsv FILE --out DIR [--shard-size N] [--seed N | --keep-order]
                            [--max-bad-fraction F] [--strict] [--workers N]
                            [--labelmap FILE] [--metrics FILE]

Samples are written in a seeded global permutation of the TSV (`--seed`, default 0), so shards
cut from a class-sorted TSV mix the classes; `--keep-order` keeps the TSV's line order. Bad
records are skipped and listed in DIR/manifest.json; more than `--max-bad-fraction` of them (or,
with --strict, any) stop the conversion (exit 1, "file:line: reason") and DIR is left untouched.
DIR holds the shards, one consolidated sample index (`index.bin`) and `manifest.json`, which
records each file's bytes and sha256 so that remote readers verify their downloads.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

# this checkout's seed_core, not an installed one: `dvc exp run --temp` / `--queue` run the
# stages in a copy of the repository, and the copy's code is the code DVC recorded
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from seed_core import program
from seed_core.config import load_params
from seed_core.data.convert import (DEFAULT_MAX_BAD_FRACTION, DEFAULT_SHARD_SIZE,
                                    ShardConversionError, convert_tsv_to_shards)
from seed_core.io import write_json
from seed_core.stagekit import run_times, setup_logging, tracked

log = logging.getLogger("stages.shards")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tsv", required=True, help="SEED TSV: key<TAB>label<TAB>base64 image")
    parser.add_argument("--out", required=True, help="output directory of shard-NNNNNN.tar")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="samples per shard (params: data.shard_size)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--seed", type=int, default=0,
                       help="seed of the global permutation the samples are written in")
    order.add_argument("--keep-order", action="store_true",
                       help="write the samples in the TSV's line order (no shuffle)")
    parser.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                        help="fail when more than this fraction of the lines is bad "
                             "(params: data.max_bad_fraction)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first bad record instead of skipping it")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="decoding processes (default: number of CPUs)")
    parser.add_argument("--labelmap", help="class names, one per line (default: labelmap.txt "
                                           "beside the TSV, if present)")
    parser.add_argument("--metrics", help="write counts and records/s here as JSON")
    parser.add_argument("--params", default="params.yaml",
                        help="params file; MLflow tracking only when it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    # a standalone conversion of any TSV needs no pipeline configuration (and is not tracked)
    params = load_params(args.params) if Path(args.params).is_file() else None
    try:
        with tracked("shards", params, params_path=args.params) as tracker:
            start = time.perf_counter()
            manifest = convert_tsv_to_shards(
                args.tsv, args.out, shard_size=args.shard_size, strict=args.strict,
                workers=args.workers, labelmap=args.labelmap,
                shuffle_seed=None if args.keep_order else args.seed,
                max_bad_fraction=args.max_bad_fraction)
            seconds = time.perf_counter() - start
            metrics = {"samples": manifest["samples"], "skipped": len(manifest["skipped"]),
                       "lines": manifest["lines"], "shards": len(manifest["shards"]),
                       "seconds": round(seconds, 3),
                       "records_per_s": round(manifest["lines"] / max(seconds, 1e-9), 1),
                       **run_times()}
            if args.metrics:
                write_json(args.metrics, metrics)
            tracker.log_metrics(metrics)
    except (ShardConversionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    program.run(main)
